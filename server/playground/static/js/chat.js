// The Chat tab: a conversation with the served model, each answer streamed token by token.

import { streamAnswer } from "./answer.js";

export function setupChat(context) {
  const { $ } = context;
  const messages = [];
  let running = null;

  function bubble(role, text) {
    const element = document.createElement("div");
    element.className = `message ${role}`;
    element.textContent = text;
    $("chat-log").append(element);
    element.scrollIntoView({ block: "end" });
    return element;
  }

  async function send() {
    const prompt = $("chat-prompt").value.trim();
    if (!prompt || running) return;
    const body = { messages: [...messages, { role: "user", content: prompt }], ...context.sampling() };
    if ($("chat-steer").checked) body.interventions = [context.steering()];
    const user = bubble("user", prompt);
    const reply = bubble("assistant", "");
    $("chat-prompt").value = "";
    running = new AbortController();
    $("chat-stop").disabled = false;
    try {
      const text = await streamAnswer(reply, body, running.signal);
      messages.push({ role: "user", content: prompt }, { role: "assistant", content: text });
    } catch (error) {
      if (error.name === "AbortError") {
        // Stopped: the answer so far is the assistant's turn, as shown.
        messages.push({ role: "user", content: prompt }, { role: "assistant", content: reply.textContent });
        return;
      }
      reply.textContent = error.display || String(error);
      if (!$("chat-prompt").value) $("chat-prompt").value = prompt; // to send again without retyping
      for (const turn of [user, reply]) {
        turn.classList.add("dropped");
        turn.title = "not part of the conversation: this turn failed";
      }
      throw error;
    } finally {
      running = null;
      $("chat-stop").disabled = true;
    }
  }

  context.action($("chat-send"), send);
  $("chat-prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("chat-send").click();
  });
  $("chat-stop").addEventListener("click", () => running && running.abort());
  $("chat-clear").addEventListener("click", () => {
    messages.length = 0;
    $("chat-log").textContent = "";
  });
}
