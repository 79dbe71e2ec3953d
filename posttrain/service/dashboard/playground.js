// The job page's playground: one prompt, answered by the model the job started from and by the model it
// trained, side by side and streamed (POST /v1/chat/completions with the page's key, as any OpenAI client).

import { AuthError, api, chatStream } from "./api.js";
import { h } from "./dom.js";

const MAX_TOKENS = 128;

/** One column: the model's name, its answer as it streams in, and how it ended. */
function column(role, title, model) {
  const text = h("pre", { class: "answer-text" });
  const status = h("span", { class: "muted small answer-status" });
  const element = h("div", { class: "answer", "data-role": role, "data-state": "idle" },
    h("div", { class: "answer-head" }, h("strong", {}, title), h("span", { class: "mono small" }, model)),
    text, status);
  return { element, text, status, model };
}

async function answer(target, messages, options, signal, page) {
  target.text.textContent = "";
  target.text.dataset.chunks = "0";
  target.element.dataset.state = "streaming";
  target.status.textContent = "…";
  let chunks = 0;
  try {
    for await (const chunk of chatStream({ model: target.model, messages, ...options }, signal)) {
      const piece = chunk.choices?.[0]?.delta?.content;
      if (!piece) continue;
      target.text.append(piece);
      target.text.dataset.chunks = String(++chunks);
    }
    target.element.dataset.state = "done";
    target.status.textContent = "";
  } catch (error) {
    if (signal.aborted) return;
    target.element.dataset.state = "error";
    target.status.textContent = `error: ${error.message}`;
    if (error instanceof AuthError) page.onError(error);
  }
}

/**
 * The playground for a job whose trained model the server serves (GET /v1/models/<job id>); null when it
 * serves none (the job has not succeeded, its final/ was deleted, a reward model). Returns {element, stop}.
 */
export async function playground(page, jobId) {
  let model;
  try {
    model = await api.model(jobId);
  } catch (error) {
    if (error.status === 404) return null;
    throw error;
  }
  const base = column("base", "Base model", model.parent);
  const tuned = column("tuned", "Fine-tuned", model.id);
  const prompt = h("textarea", { id: "playground-prompt", rows: 3, placeholder: "Ask both models something…" });
  const temperature = h("input", { id: "playground-temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const maxTokens = h("input", { id: "playground-max-tokens", type: "number", min: 1, max: 4096, value: MAX_TOKENS });
  const send = h("button", { type: "submit", id: "playground-send" }, "Send");
  let running = null;

  async function ask(event) {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text) return;
    running?.abort();
    running = new AbortController();
    const options = { temperature: Number(temperature.value), max_tokens: Number(maxTokens.value) };
    const messages = [{ role: "user", content: text }];
    send.disabled = true;
    // Both at once: the server batches them together.
    await Promise.all([base, tuned].map((target) => answer(target, messages, options, running.signal, page)));
    send.disabled = false;
  }

  const element = h("section", { class: "card", id: "playground" },
    h("h2", {}, "Playground"),
    h("form", { class: "playground-form", onsubmit: ask },
      prompt,
      h("div", { class: "playground-options" },
        h("label", {}, "Temperature ", temperature), h("label", {}, "Max tokens ", maxTokens), send)),
    h("div", { class: "answers" }, base.element, tuned.element));
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) ask(event);
  });
  return { element, stop: () => running?.abort() };
}
