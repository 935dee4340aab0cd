// One streamed answer written into one element as its chunks arrive. The element's
// data-state says where it is (streaming, done, failed) and data-chunks how many chunks
// carried text, so a reader (or a test) can tell a streamed answer from one written at once.

import { stream } from "./api.js";

export async function streamAnswer(element, body, signal) {
  element.textContent = "";
  element.dataset.state = "streaming";
  element.dataset.chunks = "0";
  element.classList.remove("failed");
  let chunks = 0;
  let finish = null;
  try {
    await stream(
      "/v1/chat/completions",
      body,
      (chunk) => {
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) return;
        const text = choice.delta && choice.delta.content;
        if (text) {
          element.textContent += text;
          element.dataset.chunks = String(++chunks);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      },
      signal,
    );
    element.dataset.state = "done";
    element.dataset.finish = finish || "";
    return element.textContent;
  } catch (error) {
    element.dataset.state = error.name === "AbortError" ? "stopped" : "failed";
    if (error.name !== "AbortError") element.classList.add("failed");
    throw error;
  }
}
