// The Steer tab: one intervention (a stored vector added at a layer, or an SAE feature added
// along its decoder row), a contrastive-vector builder, and a side-by-side comparison of the
// same prompt answered with and without the intervention, with the same seed.
// context.steering() gives the intervention item the other tabs apply.

import { postJson } from "./api.js";
import { streamAnswer } from "./answer.js";

export function setupSteer(context) {
  const { $ } = context;
  let vectors = [];
  let saes = [];

  function fillSelect(select, names, keep) {
    const previous = keep ?? select.value;
    select.textContent = "";
    for (const name of names) select.append(new Option(name, name));
    if (names.includes(previous)) select.value = previous;
  }

  function chosenVector() {
    return vectors.find((vector) => vector.name === $("steer-vector").value);
  }

  function chosenSae() {
    return saes.find((sae) => sae.name === $("steer-sae").value);
  }

  function describe() {
    const vector = chosenVector();
    $("steer-vector-facts").textContent = vector
      ? `${vector.hook_point || "resid_post"} · norm ${Number(vector.norm).toFixed(2)} · ${vector.method}`
      : "no stored vector yet: build one below";
    const sae = chosenSae();
    $("steer-sae-facts").textContent = sae
      ? `${sae.hook_point} · ${sae.d_sae} features · ${sae.architecture}`
      : "no SAE loaded (start the server with --sae NAME=FOLDER, or POST /v1/saes)";
    $("steer-strength-value").textContent = $("steer-strength").value;
    try {
      $("steer-summary").textContent = `sends ${JSON.stringify(context.steering())}`;
    } catch (error) {
      $("steer-summary").textContent = error.message;
    }
  }

  function pickVector(name) {
    $("steer-vector").value = name;
    const vector = chosenVector();
    if (vector && vector.layer !== null && vector.layer !== undefined) $("steer-layer").value = vector.layer;
    describe();
  }

  context.steering = () => {
    const strength = Number($("steer-strength").value);
    if ($("steer-source").value === "sae") {
      const sae = chosenSae();
      if (!sae) throw new Error("no SAE is loaded to steer with");
      return { type: "sae_add", sae: sae.name, feature: Number($("steer-feature").value), strength };
    }
    const vector = chosenVector();
    if (!vector) throw new Error("no stored vector to steer with: build a contrastive vector first");
    if ($("steer-layer").value === "") throw new Error("choose the layer to add the vector at");
    return {
      type: "add",
      layer: Number($("steer-layer").value),
      hook_point: vector.hook_point || "resid_post",
      vector: vector.name,
      scale: strength,
    };
  };

  // Set the intervention to an SAE feature (the Inspect tab's feature list calls this).
  context.steerWithFeature = (sae, feature) => {
    $("steer-source").value = "sae";
    $("steer-sae").value = sae;
    $("steer-feature").value = feature;
    $("steer-source").dispatchEvent(new Event("change"));
  };

  context.listeners.push((lists) => {
    vectors = lists.vectors;
    saes = lists.saes;
    fillSelect($("steer-vector"), vectors.map((vector) => vector.name));
    fillSelect($("steer-sae"), saes.map((sae) => sae.name));
    if ($("steer-layer").value === "") pickVector($("steer-vector").value);
    describe();
  });

  $("steer-source").addEventListener("change", () => {
    const sae = $("steer-source").value === "sae";
    $("steer-sae-fields").hidden = !sae;
    $("steer-vector-fields").hidden = sae;
    describe();
  });
  $("steer-vector").addEventListener("change", () => pickVector($("steer-vector").value));
  for (const id of ["steer-sae", "steer-feature", "steer-layer", "steer-strength"]) {
    $(id).addEventListener("input", describe);
  }

  context.action($("contrast-build"), async () => {
    const lines = (id) => $(id).value.split("\n").map((line) => line.trim()).filter(Boolean);
    const layer = Number($("contrast-layer").value);
    const made = await postJson("/v1/vectors/contrastive", {
      name: $("contrast-name").value.trim(),
      positive: lines("contrast-positive"),
      negative: lines("contrast-negative"),
      layers: [layer],
      hook_point: "resid_post",
    });
    const name = made.data ? made.data[0].name : `${$("contrast-name").value.trim()}-layer${layer}`;
    await context.refreshLists();
    $("steer-source").value = "vector";
    $("steer-source").dispatchEvent(new Event("change"));
    pickVector(name);
    $("contrast-status").textContent = `stored ${name}`;
  });

  context.action($("steer-compare"), async () => {
    const prompt = $("steer-prompt").value.trim();
    if (!prompt) throw new Error("write a prompt to compare");
    const item = context.steering();
    const shared = { messages: [{ role: "user", content: prompt }], ...context.sampling({ freshSeed: true }) };
    $("steer-seed").textContent = `seed ${shared.seed}`;
    const run = new AbortController();
    try {
      // If one side fails, the other is stopped: the button comes back with nothing streaming.
      await Promise.all(
        [
          streamAnswer($("steer-plain"), shared, run.signal),
          streamAnswer($("steer-steered"), { ...shared, interventions: [item] }, run.signal),
        ].map((side) => side.catch((error) => { run.abort(); throw error; })),
      );
    } finally {
      run.abort();
    }
  });
}
