// The page's start: the key, the cluster's live view (server-sent events read through
// fetch, so the key can go in a header), the prompt-cache reset and the chat.

import { apiFetch, forgetKey, installKeyDialog, loadSettings, serverSentEvents } from "./api.js";
import { installChat } from "./chat.js";
import { showCluster } from "./cluster.js";

const RECONNECT_AFTER = 2000; // ms before the cluster's events are asked for again

function showProblem(text) {
  const status = document.getElementById("status");
  status.textContent = "no connection";
  status.className = "pill unavailable";
  document.getElementById("summary").textContent = text;
}

async function followCluster() {
  for (;;) {
    try {
      const response = await apiFetch("/v1/cluster/events");
      for await (const { event, data } of serverSentEvents(response)) {
        if (event === "cluster") showCluster(JSON.parse(data));
      }
      showProblem("the API closed the cluster's events; reconnecting");
    } catch (err) {
      showProblem(`${err.message}; reconnecting`);
    }
    await new Promise((resolve) => setTimeout(resolve, RECONNECT_AFTER));
  }
}

function installResetButton() {
  const button = document.getElementById("reset-cache");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const response = await apiFetch("/v1/cluster/reset_prefix_cache", { method: "POST" });
      const done = await response.json();
      button.textContent = `Dropped ${done.dropped_entries} entries (${done.dropped_tokens} tokens)`;
    } catch (err) {
      button.textContent = `Reset failed: ${err.message}`;
    }
    setTimeout(() => {
      button.textContent = "Reset prompt cache";
      button.disabled = false;
    }, 3000);
  });
}

async function start() {
  installKeyDialog();
  const settings = await loadSettings();
  const forget = document.getElementById("forget-key");
  forget.hidden = !settings.api_key_required;
  forget.addEventListener("click", () => {
    forgetKey();
    location.reload();
  });
  installResetButton();
  installChat();
  followCluster();
}

start();
