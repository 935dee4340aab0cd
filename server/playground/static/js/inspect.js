// The Inspect tab: one answer captured in generate mode (every layer's resid_post, the logit
// lens, an SAE's top features), read back from the capture's safetensors files, shown as a
// token x layer heatmap, a logit-lens table and a per-token feature list. The capture is
// deleted from the server once read.

import { getJson, postJson, remove, tensor, tokenText } from "./api.js";
import { drawHeatmap, shade, visible } from "./heatmap.js";

const LENS_TOP_K = 5;
const SAE_TOP_K = 5;
// What one run may show: a cell per token and layer is a page element (and a lens cell a
// table cell), and every layer's float32 residual stream is downloaded.
const MAX_CELLS = 40_000;
const MAX_READ_BYTES = 512 * 2 ** 20;

// Per position of a [positions, width] tensor: its L2 norm, or its projection on unit(v).
function perPosition({ shape, data }, direction) {
  const [positions, width] = shape;
  let scale = 1;
  if (direction) scale = 1 / Math.sqrt(direction.reduce((sum, x) => sum + x * x, 0));
  const out = new Float64Array(positions);
  for (let p = 0; p < positions; p++) {
    let sum = 0;
    const row = p * width;
    if (direction) for (let i = 0; i < width; i++) sum += data[row + i] * direction[i];
    else for (let i = 0; i < width; i++) sum += data[row + i] * data[row + i];
    out[p] = direction ? sum * scale : Math.sqrt(sum);
  }
  return out;
}

export function setupInspect(context) {
  const { $ } = context;
  let capture = null; // the last run: {tokens, resid: one [positions, hidden] tensor per layer}
  const vectorValues = new Map();

  context.listeners.push(({ vectors, saes }) => {
    vectorValues.clear(); // a vector rebuilt under the same name has new values
    const keep = $("heatmap-vector").value;
    $("heatmap-vector").textContent = "";
    for (const vector of vectors) $("heatmap-vector").append(new Option(vector.name, vector.name));
    if (vectors.some((vector) => vector.name === keep)) $("heatmap-vector").value = keep;
    const keepSae = $("inspect-sae").value;
    $("inspect-sae").textContent = "";
    $("inspect-sae").append(new Option("none", ""));
    for (const sae of saes) $("inspect-sae").append(new Option(sae.name, sae.name));
    if (saes.some((sae) => sae.name === keepSae)) $("inspect-sae").value = keepSae;
  });

  async function direction() {
    const name = $("heatmap-vector").value;
    if (!name) throw new Error("no stored vector to project on");
    if (!vectorValues.has(name)) vectorValues.set(name, (await getJson(`/v1/vectors/${encodeURIComponent(name)}`)).values);
    const values = vectorValues.get(name);
    if (!values.some((x) => x !== 0)) throw new Error(`vector ${name} is zero: it has no direction`);
    if (values.length !== context.structure.hidden_size) {
      throw new Error(`vector ${name} has ${values.length} values, resid_post has ${context.structure.hidden_size}`);
    }
    return values;
  }

  async function renderHeatmap() {
    if (!capture) return;
    const projection = $("heatmap-metric").value === "projection";
    const along = projection ? await direction() : null;
    const values = capture.resid.map((layer) => perPosition(layer, along));
    const what = projection ? `projection of resid_post on unit(${$("heatmap-vector").value})` : "‖resid_post‖";
    const perLayer = $("heatmap-scale").value === "layer";
    const range = drawHeatmap($("heatmap"), capture.tokens, values, { diverging: projection, what, perLayer });
    $("heatmap-legend").textContent =
      `Rows: layers (the last on top); columns: tokens. ${what}: ${range.low.toFixed(2)} … ${range.high.toFixed(2)}; ` +
      `colours up to the 95th percentile ${perLayer ? "of each layer" : "of the map"}` +
      (projection ? " (blue negative, red positive)" : "");
  }

  function note(element, text) {
    element.append(Object.assign(document.createElement("p"), { className: "muted", textContent: text }));
  }

  async function renderLens(layers) {
    const lens = $("lens");
    lens.textContent = "";
    if (!layers.length) return note(lens, "Not asked for: tick \"logit lens\" and run again.");
    const ids = layers.flatMap((layer) => layer.indices.data);
    const texts = await tokenText(ids);
    const textOf = new Map(ids.map((id, i) => [id, texts[i]]));
    const table = document.createElement("table");
    table.className = "lens";
    const head = table.createTHead().insertRow();
    head.append(Object.assign(document.createElement("th"), { textContent: "layer" }));
    for (const token of capture.tokens) {
      head.append(Object.assign(document.createElement("th"), { textContent: visible(token), className: "token" }));
    }
    const body = table.createTBody();
    for (const layer of [...layers].reverse()) {
      const row = body.insertRow();
      row.dataset.layer = layer.layer;
      row.append(Object.assign(document.createElement("th"), { textContent: layer.layer }));
      const k = layer.indices.shape[1];
      capture.tokens.forEach((_, position) => {
        const cell = row.insertCell();
        const top = Array.from({ length: k }, (_, j) => ({
          text: textOf.get(layer.indices.data[position * k + j]),
          logprob: layer.logprobs.data[position * k + j],
        }));
        cell.textContent = visible(top[0].text);
        cell.dataset.position = position;
        cell.dataset.tokenId = layer.indices.data[position * k];
        cell.title = top.map((entry) => `${JSON.stringify(entry.text)} ${entry.logprob.toFixed(2)}`).join("\n");
        cell.style.background = shade(Math.exp(top[0].logprob), 220);
      });
    }
    lens.append(table);
  }

  function renderFeatures(sae, indices, values) {
    const list = $("sae-features");
    list.textContent = "";
    if (!sae) {
      return note(
        list,
        $("inspect-sae").options.length > 1
          ? "No SAE chosen: pick one above and run again."
          : "No SAE is loaded: start the server with --sae NAME=FOLDER, or load one with POST /v1/saes.",
      );
    }
    const k = indices.shape[1];
    const table = document.createElement("table");
    table.className = "features";
    capture.tokens.forEach((token, position) => {
      const row = table.insertRow();
      row.dataset.position = position;
      row.append(Object.assign(document.createElement("th"), { textContent: visible(token), className: "token" }));
      const cell = row.insertCell();
      for (let j = 0; j < k; j++) {
        const value = values.data[position * k + j];
        if (!(value > 0)) continue;
        const feature = indices.data[position * k + j];
        const chip = document.createElement("button");
        chip.type = "button";
        chip.className = "feature";
        chip.dataset.feature = feature;
        chip.textContent = `${feature} · ${value.toFixed(2)}`;
        chip.title = `steer with feature ${feature} of ${sae}`;
        chip.addEventListener("click", () => context.steerWithFeature(sae, feature));
        cell.append(chip);
      }
    });
    list.append(table);
  }

  // Each view drawn on its own: one that cannot be drawn says why and leaves the others.
  async function draw(view) {
    try {
      await view();
    } catch (error) {
      context.showError(error);
    }
  }

  async function readCapture(id, layers, lens, sae) {
    const manifest = await getJson(`/v1/activations/${encodeURIComponent(id)}`);
    const tokens = manifest.token_positions.length;
    const bytes = manifest.tensors.reduce((sum, entry) => sum + entry.bytes, 0);
    if (tokens * layers > MAX_CELLS || bytes > MAX_READ_BYTES) {
      throw new Error(
        `this capture is too large to show (${tokens} tokens x ${layers} layers, ` +
          `${(bytes / 2 ** 20).toFixed(0)} MiB): choose "answer only" or fewer max_tokens`,
      );
    }
    $("inspect-status").textContent = `reading ${manifest.tensors.length} tensors…`;
    const read = (name) => tensor(id, name);
    const each = (make) => Promise.all(Array.from({ length: layers }, (_, layer) => make(layer)));
    const resid = await each((layer) => read(`layers.${layer}.resid_post`));
    const lensLayers = lens
      ? await each(async (layer) => ({
          layer,
          indices: await read(`logit_lens.layers.${layer}.indices`),
          logprobs: await read(`logit_lens.layers.${layer}.logprobs`),
        }))
      : [];
    const features = sae ? await Promise.all([read(`saes.${sae}.indices`), read(`saes.${sae}.values`)]) : [];
    return { tokens: manifest.tokens, resid, lensLayers, features };
  }

  context.action($("inspect-run"), async () => {
    const prompt = $("inspect-prompt").value.trim();
    if (!prompt) throw new Error("write a prompt to inspect");
    const sae = $("inspect-sae").value;
    const lens = $("inspect-lens").checked;
    const request = {
      messages: [{ role: "user", content: prompt }],
      ...context.sampling(),
      capture: {
        mode: "generate",
        layers: "all",
        hook_points: ["resid_post"],
        positions: $("inspect-positions").value,
        dtype: "float32",
        ...(lens ? { logit_lens: "all", logit_lens_top_k: LENS_TOP_K } : {}),
        ...(sae ? { saes: [sae], sae_top_k: SAE_TOP_K } : {}),
      },
    };
    if ($("inspect-steer").checked) request.interventions = [context.steering()];
    $("inspect-status").textContent = "generating…";
    try {
      const reply = await postJson("/v1/chat/completions", request);
      $("inspect-answer").textContent = reply.choices[0].message.content;
      const id = reply.activations.id;
      const layers = context.structure.num_layers;
      let read;
      try {
        read = await readCapture(id, layers, lens, sae);
      } finally {
        await remove(`/v1/activations/${encodeURIComponent(id)}`);
      }
      capture = { tokens: read.tokens, resid: read.resid };
      $("inspect-status").textContent = "drawing…";
      await draw(renderHeatmap);
      await draw(() => renderLens(read.lensLayers));
      await draw(() => renderFeatures(sae, ...read.features));
      $("inspect-status").textContent =
        `${capture.tokens.length} tokens x ${layers} layers · capture ${id} read and deleted`;
    } catch (error) {
      $("inspect-status").textContent = "failed: see the message above";
      throw error;
    }
  });

  for (const id of ["heatmap-metric", "heatmap-vector", "heatmap-scale"]) {
    $(id).addEventListener("change", async () => {
      try {
        await renderHeatmap();
      } catch (error) {
        context.showError(error);
      }
    });
  }
}
