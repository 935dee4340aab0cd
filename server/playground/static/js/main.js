// The page's frame: the API key, the model, the tabs, the sampling controls, and the error line.
// Each tab is its own module (chat.js, steer.js, inspect.js, lda.js) given this shared context.

import { ApiError, getJson, saveKey, savedKey } from "./api.js";
import { setupChat } from "./chat.js";
import { setupInspect } from "./inspect.js";
import { setupLda } from "./lda.js";
import { setupSteer } from "./steer.js";

const $ = (id) => document.getElementById(id);

function showError(error) {
  const line = $("error");
  if (!error) {
    line.hidden = true;
    line.textContent = "";
    return;
  }
  line.textContent = error instanceof ApiError ? error.display : String(error.message || error);
  if (error.status === 401) line.textContent += " Enter this server's API key in the form below.";
  line.hidden = false;
  if (error.status === 401) openKeyForm();
}

function openKeyForm() {
  $("key-form").hidden = false;
  $("key-input").focus();
}

// Sampling fields every request of a comparison shares; seed: the given one or a fresh random one.
function sampling({ freshSeed = false } = {}) {
  const out = {
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  const seed = $("seed").value;
  if (seed !== "") {
    out.seed = Number(seed);
    if (!Number.isInteger(out.seed) || out.seed < 0) throw new Error("seed: a whole number, 0 or more");
  }
  else if (freshSeed) out.seed = Math.floor(Math.random() * 2 ** 31);
  return out;
}

// Run an action from a button: the button is disabled meanwhile, the error line shows failures.
function action(button, run) {
  button.addEventListener("click", async () => {
    button.disabled = true;
    showError(null);
    try {
      await run();
    } catch (error) {
      if (error.name !== "AbortError") showError(error);
    } finally {
      button.disabled = false;
    }
  });
}

const context = { $, showError, sampling, action, model: null, structure: null, listeners: [] };

// Lists (vectors, SAEs) that several tabs show are refreshed through here.
context.refreshLists = async () => {
  const [vectors, saes] = await Promise.all([getJson("/v1/vectors"), getJson("/v1/saes")]);
  for (const listener of context.listeners) listener({ vectors: vectors.data, saes: saes.data });
};

async function connect() {
  try {
    const models = await getJson("/v1/models");
    context.model = models.data[0].id;
    context.structure = await getJson("/v1/model/structure");
    $("model-name").textContent = `${context.model} · ${context.structure.num_layers} layers · ${context.structure.device}`;
    $("key-form").hidden = true;
    showError(null);
    await context.refreshLists();
  } catch (error) {
    $("model-name").textContent = "not connected";
    showError(error);
  }
}

function setupTabs() {
  for (const tab of document.querySelectorAll("#tabs button")) {
    tab.addEventListener("click", () => {
      for (const other of document.querySelectorAll("#tabs button")) {
        other.setAttribute("aria-selected", String(other === tab));
      }
      for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${tab.dataset.view}`;
      // Vectors or SAEs made meanwhile by another client appear without a reload.
      if (context.structure) context.refreshLists().catch(showError);
    });
  }
}

function setupKey() {
  $("key-open").addEventListener("click", openKeyForm);
  $("key-input").value = savedKey();
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    saveKey($("key-input").value.trim());
    await connect();
  });
  $("key-forget").addEventListener("click", () => {
    saveKey("");
    $("key-input").value = "";
  });
}

setupTabs();
setupKey();
setupChat(context);
setupSteer(context);
setupInspect(context);
setupLda(context);
connect();
