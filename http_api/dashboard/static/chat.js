// The chat panel: a conversation streamed from /v1/chat/completions, each answer rendered
// as Markdown (markdown.js: text nodes only) as its tokens arrive, with its tokens/s.

import { apiFetch, serverSentEvents } from "./api.js";
import { renderMarkdown } from "./markdown.js";

const conversation = [];
let model = null;
let running = null; // the AbortController of the answer under way

function bubble(role) {
  const node = document.createElement("div");
  node.className = `message ${role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "you" : role;
  const body = document.createElement("div");
  body.className = "body";
  node.append(who, body);
  document.getElementById("transcript").append(node);
  return body;
}

function show(body, text, asCode) {
  if (asCode) {
    const pre = document.createElement("pre");
    const code = document.createElement("code");
    code.textContent = text;
    pre.append(code);
    body.replaceChildren(pre);
  } else {
    body.replaceChildren(...renderMarkdown(text));
  }
  const transcript = document.getElementById("transcript");
  transcript.scrollTop = transcript.scrollHeight;
}

function readSettings() {
  const request = {
    temperature: Number(document.getElementById("temperature").value),
    max_tokens: Number(document.getElementById("max-tokens").value),
  };
  const schema = document.getElementById("schema").value.trim();
  if (schema) {
    request.response_format = { type: "json_schema", json_schema: { name: "answer", schema: JSON.parse(schema) } };
  }
  return request;
}

function stats(text) {
  document.getElementById("chat-stats").textContent = text;
}

async function servedModel() {
  if (model === null) {
    const models = await (await apiFetch("/v1/models")).json();
    model = models.data[0].id;
  }
  return model;
}

async function send(message) {
  let settings;
  try {
    settings = readSettings();
  } catch (err) {
    stats(`The JSON schema does not parse: ${err.message}`);
    return;
  }
  conversation.push({ role: "user", content: message });
  show(bubble("user"), message);
  const body = bubble("assistant");
  body.parentElement.classList.add("streaming");
  const structured = Boolean(settings.response_format);
  running = new AbortController();
  setRunning(true);
  stats("waiting for the first token…");
  const sent = performance.now();
  let text = "";
  let first = null;
  let usage = null;
  try {
    const response = await apiFetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        model: await servedModel(), messages: conversation, stream: true,
        stream_options: { include_usage: true }, ...settings,
      }),
      signal: running.signal,
    });
    for await (const { data } of serverSentEvents(response, running.signal)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      usage = chunk.usage || usage;
      const piece = chunk.choices?.[0]?.delta?.content;
      if (piece) {
        first = first ?? performance.now();
        text += piece;
        show(body, text, structured);
        stats(`${text.length} characters so far…`);
      }
    }
    if (running.signal.aborted) throw new DOMException("stopped", "AbortError");
    conversation.push({ role: "assistant", content: text });
    const tokens = usage?.completion_tokens ?? 0;
    const seconds = (performance.now() - (first ?? sent)) / 1000;
    // Tokens after the first over the time they took: decode speed, as bench/ reports it.
    const rate = tokens > 1 && seconds > 0 ? ((tokens - 1) / seconds).toFixed(1) : "–";
    const ttft = first === null ? "–" : `${((first - sent) / 1000).toFixed(2)} s`;
    const cached = usage?.prompt_tokens_details?.cached_tokens;
    stats(`${tokens} tokens · ${rate} tokens/s · first token after ${ttft}`
      + (cached ? ` · ${cached} prompt tokens cached` : ""));
  } catch (err) {
    if (err.name === "AbortError" || running.signal.aborted) {
      stats("stopped");
      if (text) conversation.push({ role: "assistant", content: text });
      else conversation.pop();
    } else {
      conversation.pop();
      body.parentElement.classList.add("failed");
      show(body, text);
      const error = document.createElement("p");
      error.className = "error";
      error.textContent = err.message;
      body.append(error);
      stats("");
    }
  } finally {
    body.parentElement.classList.remove("streaming");
    running = null;
    setRunning(false);
  }
}

function setRunning(on) {
  document.getElementById("send").disabled = on;
  document.getElementById("stop").hidden = !on;
}

export function installChat() {
  const form = document.getElementById("chat-form");
  const input = document.getElementById("message");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const message = input.value.trim();
    if (!message || running) return;
    input.value = "";
    send(message);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  document.getElementById("stop").addEventListener("click", () => running?.abort());
  document.getElementById("clear").addEventListener("click", () => {
    running?.abort();
    conversation.length = 0;
    document.getElementById("transcript").replaceChildren();
    stats("");
  });
}
