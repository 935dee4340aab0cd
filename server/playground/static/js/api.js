// The server's public HTTP API, as the playground uses it: JSON requests with the API key,
// server-sent events for streamed answers, and safetensors files for captured tensors.
// Every failure becomes an ApiError carrying the server's OpenAI-shaped message.

const KEY_STORAGE = "nnsight-server.api-key";

export class ApiError extends Error {
  constructor(status, message, param = null) {
    super(message);
    this.status = status;
    this.param = param;
  }

  get display() {
    const where = this.param ? ` (${this.param})` : "";
    return this.status ? `${this.status}: ${this.message}${where}` : this.message;
  }
}

export function savedKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function saveKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

function headers(json) {
  const out = {};
  if (json) out["content-type"] = "application/json";
  const key = savedKey();
  if (key) out.authorization = `Bearer ${key}`;
  return out;
}

// Relative to the page (…/ui/), so the page works under any host and port, a tunnel's included.
function url(path) {
  return `..${path}`;
}

async function failure(response) {
  let message = response.statusText || "request failed";
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      param = body.error.param || null;
    }
  } catch {
    // not JSON: keep the status text
  }
  return new ApiError(response.status, message, param);
}

async function send(method, path, body, signal) {
  let response;
  try {
    response = await fetch(url(path), {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `the server could not be reached (${error.message})`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

export async function getJson(path) {
  return (await send("GET", path)).json();
}

export async function postJson(path, body, signal) {
  return (await send("POST", path, body, signal)).json();
}

export async function remove(path) {
  await send("DELETE", path);
}

// POST a streamed request and call onChunk(chunk) for each server-sent event until [DONE].
export async function stream(path, body, onChunk, signal) {
  const response = await send("POST", path, { ...body, stream: true }, signal);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const event = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(0, chunk.error.message, chunk.error.param);
      onChunk(chunk);
    }
  }
  throw new ApiError(0, "the answer's stream ended before its end ([DONE]): the connection was cut");
}

const DTYPES = {
  F32: Float32Array,
  F64: Float64Array,
  I32: Int32Array,
  I64: BigInt64Array,
  U8: Uint8Array,
};

function widen(dtype, bytes) {
  // bfloat16 is the top half of a float32; float16 needs its exponent rebased.
  const halves = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
  const out = new Float32Array(halves.length);
  if (dtype === "BF16") {
    const bits = new Uint32Array(out.buffer);
    for (let i = 0; i < halves.length; i++) bits[i] = halves[i] << 16;
    return out;
  }
  for (let i = 0; i < halves.length; i++) {
    const h = halves[i];
    const sign = h & 0x8000 ? -1 : 1;
    const exponent = (h >> 10) & 0x1f;
    const fraction = h & 0x3ff;
    if (exponent === 0) out[i] = sign * 2 ** -14 * (fraction / 1024);
    else if (exponent === 31) out[i] = fraction ? NaN : sign * Infinity;
    else out[i] = sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
  }
  return out;
}

// One tensor of a capture: {shape, data} with data a flat array of Numbers (row-major).
// The file is safetensors (https://github.com/huggingface/safetensors#format): an 8-byte
// little-endian header length, a JSON header, then the raw little-endian values.
export async function tensor(activationId, name) {
  const response = await send("GET", `/v1/activations/${encodeURIComponent(activationId)}/${encodeURIComponent(name)}`);
  const buffer = await response.arrayBuffer();
  const view = new DataView(buffer);
  const headerLength = Number(view.getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, headerLength)));
  const entry = header[name] || Object.entries(header).find(([key]) => key !== "__metadata__")[1];
  const [start, end] = entry.data_offsets;
  const bytes = new Uint8Array(buffer.slice(8 + headerLength + start, 8 + headerLength + end));
  let data;
  if (entry.dtype === "BF16" || entry.dtype === "F16") data = widen(entry.dtype, bytes);
  else if (DTYPES[entry.dtype]) data = new DTYPES[entry.dtype](bytes.buffer);
  else throw new ApiError(0, `tensor ${name} has dtype ${entry.dtype}, which the playground cannot read`);
  if (data instanceof BigInt64Array) data = Array.from(data, Number);
  return { shape: entry.shape, data };
}

// Token texts for token ids, one /detokenize call per id not seen before (cached per page).
const tokenTexts = new Map();

export async function tokenText(ids) {
  const missing = [...new Set(ids)].filter((id) => !tokenTexts.has(id));
  const workers = Array.from({ length: 8 }, async () => {
    while (missing.length) {
      const id = missing.pop();
      const body = await postJson("/detokenize", { tokens: [id] });
      tokenTexts.set(id, body.prompt);
    }
  });
  await Promise.all(workers);
  return ids.map((id) => tokenTexts.get(id));
}
