// The chat: streams /v1/chat/completions (server-sent events) into the page, one answer per
// choice (n), with time to first token and tokens per second under each answer.

import { AuthRequired, apiFetch, errorMessage } from "./api.js";

const SAMPLING_FIELDS = { temperature: parseFloat, top_p: parseFloat, max_tokens: Number,
                          n: Number };

export class Chat {
  constructor(model, onAuthRequired) {
    this.model = model;
    this.onAuthRequired = onAuthRequired;
    this.history = [];  // [{role, content}], the answers' first choice included
    this.controller = null;
    this.messages = document.getElementById("messages");
    this.prompt = document.getElementById("prompt");
    this.send = document.getElementById("send");
    this.stop = document.getElementById("stop");
    document.getElementById("chat-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.ask();
    });
    this.prompt.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        this.ask();
      }
    });
    this.stop.addEventListener("click", () => this.controller?.abort());
    document.getElementById("clear").addEventListener("click", () => {
      this.controller?.abort();
      this.history = [];
      this.messages.replaceChildren();
    });
  }

  // The sampling panel's values; throws naming the field when one is not a number.
  sampling() {
    const values = {};
    for (const [name, parse] of Object.entries(SAMPLING_FIELDS)) {
      const raw = document.getElementById(name).value.trim();
      const value = parse(raw);
      if (raw === "" || !Number.isFinite(value)) throw new Error(`${name} must be a number`);
      values[name] = value;
    }
    return values;
  }

  addMessage(role, text) {
    const div = document.createElement("div");
    div.className = `message ${role}`;
    div.textContent = text;
    this.messages.append(div);
    this.messages.scrollTop = this.messages.scrollHeight;
    return div;
  }

  async ask() {
    const text = this.prompt.value.trim();
    if (!text || this.controller) return;
    let sampling;
    try {
      sampling = this.sampling();
    } catch (e) {
      this.addMessage("error", e.message);
      return;
    }
    this.prompt.value = "";
    this.addMessage("user", text);
    this.history.push({ role: "user", content: text });
    const answer = new Answer(this.addMessage("assistant", ""), sampling.n);
    this.controller = new AbortController();
    this.send.disabled = true;
    this.stop.disabled = false;
    try {
      await this.stream(answer, sampling);
      this.history.push({ role: "assistant", content: answer.texts[0] });
    } catch (e) {
      if (e instanceof AuthRequired) this.onAuthRequired();
      answer.fail(e.name === "AbortError" ? "stopped" : e.message);
      this.history.pop();
    } finally {
      this.controller = null;
      this.send.disabled = false;
      this.stop.disabled = true;
    }
  }

  async stream(answer, sampling) {
    const body = { model: this.model, messages: this.history, stream: true,
                   stream_options: { include_usage: true }, ...sampling };
    const started = performance.now();
    const response = await apiFetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: this.controller.signal });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of serverSentEvents(response.body)) {
      if (event === "[DONE]") break;
      const chunk = JSON.parse(event);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        answer.append(choice.index, choice.delta?.content || "", performance.now() - started);
      }
      if (chunk.usage) answer.usage = chunk.usage;
      this.messages.scrollTop = this.messages.scrollHeight;
    }
    answer.finish(performance.now() - started);
  }
}

// One assistant message: a text per choice, and the answer's timings.
class Answer {
  constructor(div, n) {
    this.div = div;
    this.div.dataset.state = "streaming";
    this.texts = Array(n).fill("");
    this.choices = this.texts.map(() => {
      const span = document.createElement("div");
      span.className = "choice";
      div.append(span);
      return span;
    });
    this.firstTokenMs = null;
    this.usage = null;
    this.stats = document.createElement("span");
    this.stats.className = "stats";
    div.append(this.stats);
  }

  append(index, text, elapsedMs) {
    if (!text || index >= this.texts.length) return;
    if (this.firstTokenMs === null) this.firstTokenMs = elapsedMs;
    this.texts[index] += text;
    this.choices[index].textContent = this.texts[index];
  }

  finish(elapsedMs) {
    this.div.dataset.state = "done";
    const tokens = this.usage?.completion_tokens;
    const parts = [];
    if (this.firstTokenMs !== null) parts.push(`TTFT ${this.firstTokenMs.toFixed(0)} ms`);
    // decode speed: the tokens after each choice's first one, over the time after the first
    const decodeS = (elapsedMs - (this.firstTokenMs ?? elapsedMs)) / 1000;
    const decoded = (tokens ?? 0) - this.texts.length;
    if (decoded > 0 && decodeS > 0) parts.push(`${(decoded / decodeS).toFixed(1)} tok/s`);
    if (tokens !== undefined) parts.push(`${tokens} tokens`);
    this.stats.textContent = parts.join(" · ");
  }

  fail(message) {
    this.div.dataset.state = "error";
    this.div.classList.add("error");
    this.stats.textContent = message;
  }
}

// The data of each server-sent event of a streamed body.
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}
