// The LDA tab: the same prompt and seed decoded three ways through POST /v1/lda, with
// logits_after + alpha (logits_after - logits_before): alpha -1 (the before side alone),
// 0 (the after side alone) and the chosen alpha; every token shaded by the KL divergence
// of the two sides' next-token distributions at that step (token_stats).

import { postJson } from "./api.js";
import { shade } from "./heatmap.js";

export function setupLda(context) {
  const { $ } = context;

  function before() {
    const kind = $("lda-before-kind").value;
    const value = $("lda-before-value").value;
    if (kind === "") return {};
    if (kind === "system_prompt" || kind === "prefix") {
      if (!value.trim()) throw new Error(`write the before side's ${kind === "prefix" ? "prefix" : "system prompt"}`);
      return { before: { [kind]: value } };
    }
    if (kind === "interventions") return { before: { interventions: [context.steering()] } };
    if (kind === "adapter") return { before: { adapter: "off" } };
    return { before: { model: context.structure.lda_before || "" } };
  }

  function column(title, result, maxKl) {
    const box = document.createElement("div");
    box.className = "lda-side";
    box.append(Object.assign(document.createElement("h3"), { textContent: title }));
    const text = document.createElement("div");
    text.className = "answer";
    text.dataset.completion = result.completion;
    for (const token of result.tokens) {
      const span = document.createElement("span");
      span.className = "lda-token";
      span.textContent = token.token;
      span.dataset.kl = token.kl;
      span.title =
        `KL(after ‖ before) ${token.kl.toFixed(3)} nats\n` +
        `logprob after ${token.logprob_after.toFixed(2)}, before ${token.logprob_before.toFixed(2)}`;
      span.style.background = shade(token.kl / maxKl, 0);
      text.append(span);
    }
    box.append(text);
    box.append(Object.assign(document.createElement("p"), {
      className: "muted",
      textContent: `${result.tokens_generated} tokens · ${result.finish_reason}`,
    }));
    return box;
  }

  // Offer only the before sides this server has; the text box only where it is used.
  function fitBeforeChoices() {
    const { adapter, lda_before: model } = context.structure || {};
    const unavailable = {
      adapter: adapter ? null : "the server has no --adapter to switch off",
      model: model ? null : "the server was started without --lda-before",
      "": adapter || model ? null : "the server has no default before side (no --lda-before, no --adapter)",
    };
    for (const option of $("lda-before-kind").options) {
      const why = unavailable[option.value] ?? null;
      option.disabled = why !== null;
      option.title = why || "";
    }
    const kind = $("lda-before-kind").value;
    $("lda-before-value").hidden = kind !== "system_prompt" && kind !== "prefix";
    $("lda-before-value").placeholder = `the before side's ${kind === "prefix" ? "prefix" : "system prompt"}`;
  }
  context.listeners.push(fitBeforeChoices);
  $("lda-before-kind").addEventListener("change", fitBeforeChoices);

  $("lda-alpha").addEventListener("input", () => {
    $("lda-alpha-value").textContent = $("lda-alpha").value;
  });

  context.action($("lda-run"), async () => {
    const prompt = $("lda-prompt").value.trim();
    if (!prompt) throw new Error("write a prompt");
    const { temperature, top_p, max_tokens, seed } = context.sampling({ freshSeed: true });
    const shared = { prompt, temperature, top_p, max_tokens, seed, token_stats: true, ...before() };
    const alpha = Number($("lda-alpha").value);
    const sides = [
      ["before (α = −1)", -1],
      ["after (α = 0)", 0],
      [`amplified (α = ${alpha})`, alpha],
    ];
    $("lda-status").textContent = `decoding three ways with seed ${seed}…`;
    let results;
    try {
      results = await Promise.all(sides.map(([, a]) => postJson("/v1/lda", { ...shared, alpha: a })));
    } catch (error) {
      $("lda-status").textContent = "failed: see the message above";
      $("lda-columns").textContent = ""; // no earlier run's columns under this failure
      throw error;
    }
    const rows = results.map((response) => response.results[0]);
    let maxKl = 1e-6;
    for (const row of rows) for (const token of row.tokens) maxKl = Math.max(maxKl, token.kl);
    $("lda-columns").textContent = "";
    rows.forEach((row, i) => $("lda-columns").append(column(sides[i][0], row, maxKl)));
    $("lda-status").textContent = `seed ${seed} · before side: ${results[0].before} · darkest red: KL ${maxKl.toFixed(3)} nats`;
  });
}
