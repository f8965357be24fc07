// Talking to the API: the key (this tab's sessionStorage only), requests that carry it,
// and server-sent events read from a fetch() body (EventSource cannot send a header).

const KEY_ITEM = "mlx-ring-api-key";
let keyRequired = false;
let keyWaiters = [];

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export async function loadSettings() {
  const response = await fetch("/dashboard/settings.json");
  const settings = await response.json();
  keyRequired = settings.api_key_required;
  return settings;
}

function storedKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
}

export function haveKey() {
  return !keyRequired || Boolean(storedKey());
}

// Ask the person for the key (the dialog in index.html); resolves once one is given.
export function askForKey(why) {
  const dialog = document.getElementById("key-dialog");
  const error = document.getElementById("key-error");
  error.hidden = !why;
  error.textContent = why || "";
  if (!dialog.open) dialog.showModal();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

export function installKeyDialog() {
  const form = document.getElementById("key-form");
  form.addEventListener("submit", () => {
    const input = document.getElementById("key-input");
    sessionStorage.setItem(KEY_ITEM, input.value.trim());
    input.value = "";
    const waiters = keyWaiters;
    keyWaiters = [];
    waiters.forEach((resolve) => resolve());
  });
}

async function keyReady() {
  while (!haveKey()) await askForKey("");
}

// fetch() with the key; an error answer becomes an ApiError with the API's message. A
// refused key is forgotten and asked for again, then the request is sent once more.
export async function apiFetch(path, init = {}) {
  await keyReady();
  for (;;) {
    const headers = new Headers(init.headers || {});
    if (keyRequired) headers.set("Authorization", `Bearer ${storedKey()}`);
    const response = await fetch(path, { ...init, headers });
    if (response.ok) return response;
    const message = await errorMessage(response);
    if (response.status === 401 && keyRequired) {
      forgetKey();
      await askForKey(`The key was refused: ${message}`);
      continue;
    }
    throw new ApiError(response.status, message);
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// The events of a text/event-stream body, as {event, data} with `data` unparsed.
export async function* serverSentEvents(response, signal) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const stop = () => reader.cancel().catch(() => {});
  signal?.addEventListener("abort", stop);
  let buffered = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffered += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffered.indexOf("\n\n")) >= 0) {
        const frame = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of frame.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) yield { event, data: data.join("\n") };
      }
    }
  } finally {
    signal?.removeEventListener("abort", stop);
  }
}
