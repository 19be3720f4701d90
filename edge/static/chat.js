// The chat page: threads kept by the gateway's thread store (this browser remembers which
// ones it made), a reply rendered as it streams, Stop, and the figures of each answer.
import { readEvents } from "/static/sse.js";
import { renderMarkdown } from "/static/markdown.js";

const store = window.localStorage;
const $ = (id) => document.getElementById(id);
const ui = {
  list: $("thread-list"), messages: $("messages"), notice: $("notice"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"), form: $("send-form"), newThread: $("new-thread"),
  keyForm: $("key-form"), key: $("api-key"), keyClear: $("key-clear"), keyBox: $("key-box"),
};

let threads = loadThreads(); // [{id, title}], newest first
let current = store.getItem("sluice.thread");
let active = null; // the reply streaming now: {controller, requestId, item}

function loadThreads() {
  try {
    const list = JSON.parse(store.getItem("sluice.threads") || "[]");
    return Array.isArray(list) ? list.filter((t) => t && typeof t.id === "string") : [];
  } catch {
    return [];
  }
}

function saveThreads() {
  store.setItem("sluice.threads", JSON.stringify(threads));
  if (current) store.setItem("sluice.thread", current);
  else store.removeItem("sluice.thread");
}

function headers(json) {
  const h = {};
  if (json) h["content-type"] = "application/json";
  const key = store.getItem("sluice.apiKey");
  if (key) h.authorization = "Bearer " + key;
  return h;
}

// The server's error message, from a JSON error body (sluice's or OpenAI's shape).
async function errorOf(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error) message = body.error.message || body.error.code || message;
  } catch { /* not JSON: the status says it */ }
  if (response.status === 401) {
    ui.keyBox.open = true;
    message += " — enter an API key above";
  }
  return message;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method, headers: headers(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw new Error(await errorOf(response));
  return response.json();
}

function notice(text) {
  ui.notice.textContent = text || "";
}

// --- threads -------------------------------------------------------------------------------
function renderThreads() {
  ui.list.replaceChildren();
  for (const t of threads) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = t.title || "New thread";
    b.dataset.thread = t.id;
    if (t.id === current) b.setAttribute("aria-current", "true");
    b.addEventListener("click", () => switchTo(t.id));
    li.append(b);
    ui.list.append(li);
  }
}

async function newThread() {
  const info = await api("POST", "/api/threads", {});
  threads.unshift({ id: info.thread_id, title: "" });
  current = info.thread_id;
  saveThreads();
  renderThreads();
  ui.messages.replaceChildren();
  return current;
}

async function switchTo(id) {
  if (active) stop();
  current = id;
  saveThreads();
  renderThreads();
  await loadHistory();
  ui.prompt.focus();
}

async function loadHistory() {
  ui.messages.replaceChildren();
  notice("");
  if (!current) return;
  try {
    const data = await api("GET", `/api/threads/${encodeURIComponent(current)}/messages`);
    for (const msg of data.messages) {
      const item = addMessage(msg.role, msg.content);
      if (msg.role === "assistant") {
        const state = { done: "done", error: "error", cancelled: "stopped", interrupted: "stopped" }[msg.status] || "done";
        item.dataset.state = msg.status === "streaming" ? "elsewhere" : state;
        if (msg.status === "error") showError(item, `the reply failed (${msg.error_code || "error"})`);
        if (msg.status === "cancelled" || msg.status === "interrupted") setMeta(item, `stopped (${msg.status})`);
        if (msg.status === "streaming") setMeta(item, "still being answered (reload to see the rest)");
      }
    }
  } catch (err) {
    notice(`Could not load the thread: ${err.message}`);
  }
}

// --- messages ------------------------------------------------------------------------------
function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = `msg ${role}`;
  item.dataset.role = role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "body";
  const meta = document.createElement("div");
  meta.className = "meta";
  item.append(who, body, meta);
  setText(item, text || "");
  ui.messages.append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function setText(item, text) {
  item.dataset.text = text;
  const body = item.querySelector(".body");
  if (item.dataset.role === "assistant") body.replaceChildren(renderMarkdown(text));
  else body.textContent = text;
}

function setMeta(item, text) {
  item.querySelector(".meta").textContent = text;
}

function showError(item, message) {
  let box = item.querySelector(".error");
  if (!box) {
    box = document.createElement("div");
    box.className = "error";
    box.setAttribute("role", "alert");
    item.querySelector(".meta").before(box);
  }
  box.textContent = message;
}

function figures(meta) {
  const parts = [];
  if (meta.ttft_ms != null) parts.push(`TTFT ${Math.round(meta.ttft_ms)} ms`);
  if (meta.queue_wait_ms != null) parts.push(`queue wait ${Math.round(meta.queue_wait_ms)} ms`);
  parts.push(meta.role === "follower" ? "shared (follower)" : "own upstream call (leader)");
  if (meta.fallback_from) parts.push(`answered by ${meta.provider} for ${meta.fallback_from}`);
  return parts.join(" · ");
}

// --- sending -------------------------------------------------------------------------------
function setStreaming(on) {
  ui.send.disabled = on;
  ui.stop.disabled = !on;
}

async function send(text) {
  notice("");
  if (!current) {
    try {
      await newThread();
    } catch (err) {
      notice(`Could not create a thread: ${err.message}`);
      return;
    }
  }
  const thread = threads.find((t) => t.id === current);
  if (thread && !thread.title) {
    thread.title = text.replace(/\s+/g, " ").slice(0, 40);
    saveThreads();
    renderThreads();
  }
  addMessage("user", text);
  const item = addMessage("assistant", "");
  item.dataset.state = "waiting";
  setMeta(item, "waiting for the first token…");
  const controller = new AbortController();
  active = { controller, requestId: null, item };
  setStreaming(true);
  let text_ = "";
  let meta = null;
  let terminal = null;
  let pending = false;
  const paint = () => {
    pending = false;
    setText(item, text_);
  };
  let lastId = null; // the id of the last event read: where a resume starts
  const onEvent = (ev) => {
    if (ev.event !== "message") return; // ping: the stream is open
    if (ev.id) lastId = ev.id;
    let data;
    try {
      data = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (data.type === "meta" && data.request_id) {
      meta = data;
      item.dataset.sharing = data.role;
      item.dataset.state = "streaming";
      setMeta(item, figures(data));
    } else if (data.type === "delta" && typeof data.delta === "string") {
      if (item.dataset.state === "waiting") item.dataset.state = "streaming";
      text_ += data.delta;
      if (!pending) {
        pending = true;
        requestAnimationFrame(paint);
      }
    } else if (data.type === "usage" && meta) {
      const u = data.usage || data;
      const total = u.total_tokens ?? u.output_tokens ?? u.completion_tokens;
      if (total != null) setMeta(item, `${figures(meta)} · ${total} tokens`);
    } else if (data.type === "done") {
      terminal = "done";
    } else if (data.type === "error") {
      terminal = "error";
      showError(item, data.code === "cancelled" ? "stopped" : `${data.message || data.code}`);
    }
  };
  try {
    // resumable: a dropped connection is resumed below, the upstream call going on meanwhile
    let response = await fetch(`/api/threads/${encodeURIComponent(current)}/messages`, {
      method: "POST", headers: headers(true), body: JSON.stringify({ content: text, resumable: true }),
      signal: controller.signal,
    });
    if (!response.ok) {
      terminal = "error";
      item.dataset.state = "error";
      showError(item, await errorOf(response));
      setMeta(item, "");
      return;
    }
    active.requestId = response.headers.get("x-request-id");
    item.dataset.requestId = active.requestId || "";
    for (let resumes = 0; ; resumes++) {
      try {
        await readEvents(response, onEvent);
        if (terminal) break;
      } catch (err) {
        if (err.name === "AbortError") throw err;
      }
      // The connection dropped before the final event: resume after the last event read.
      if (!active.requestId || resumes >= MAX_RESUMES) break;
      item.dataset.resumes = String(resumes + 1);
      response = await resumeStream(active.requestId, lastId, controller.signal);
    }
    setText(item, text_);
    if (terminal === "done") item.dataset.state = "done";
    else if (terminal === "error") item.dataset.state = item.dataset.state === "stopped" ? "stopped" : "error";
    else {
      item.dataset.state = "error";
      showError(item, "the stream ended without a final event");
    }
  } catch (err) {
    setText(item, text_);
    if (err.name === "AbortError") {
      item.dataset.state = "stopped";
      setMeta(item, meta ? `${figures(meta)} · stopped` : "stopped");
    } else {
      item.dataset.state = "error";
      showError(item, `the connection failed: ${err.message}`);
    }
  } finally {
    active = null;
    setStreaming(false);
  }
}

const MAX_RESUMES = 5;

// GET the rest of a resumable stream after event `lastId` (GET /api/chat/{id}/events with
// Last-Event-ID). Retried a few times while the network is still down, or while the gateway
// has not yet noticed the old connection go (409); a stream it no longer keeps throws.
async function resumeStream(requestId, lastId, signal) {
  const extra = lastId === null ? {} : { "Last-Event-ID": lastId };
  let failure = null;
  for (let attempt = 0; attempt < 10; attempt++) {
    if (attempt > 0) await new Promise((done) => setTimeout(done, Math.min(2000, 200 * 2 ** attempt)));
    let response;
    try {
      response = await fetch(`/api/chat/${encodeURIComponent(requestId)}/events`, {
        headers: { ...headers(false), ...extra }, signal,
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      failure = err; // still offline: try again
      continue;
    }
    if (response.ok) return response;
    if (response.status !== 409) throw new Error(await errorOf(response));
    failure = new Error(await errorOf(response));
  }
  throw failure;
}

// Stop: tell the gateway to cancel this client's request (the upstream call is aborted when
// nobody else shares it), and stop reading.
async function stop() {
  if (!active) return;
  const { controller, requestId, item } = active;
  item.dataset.state = "stopped";
  if (requestId) {
    try {
      await fetch(`/api/chat/${encodeURIComponent(requestId)}/cancel`, { method: "POST", headers: headers(false) });
    } catch { /* the abort below closes the stream anyway: the gateway cancels on disconnect */ }
  }
  controller.abort();
}

// --- wiring --------------------------------------------------------------------------------
ui.form.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || active) return;
  ui.prompt.value = "";
  send(text);
});
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    ui.form.requestSubmit();
  } else if (e.key === "Escape" && active) {
    stop();
  }
});
ui.stop.addEventListener("click", stop);
ui.newThread.addEventListener("click", async () => {
  if (active) stop();
  try {
    await newThread();
    notice("");
    ui.prompt.focus();
  } catch (err) {
    notice(`Could not create a thread: ${err.message}`);
  }
});
ui.key.value = store.getItem("sluice.apiKey") || "";
ui.keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const key = ui.key.value.trim();
  if (key) store.setItem("sluice.apiKey", key);
  else store.removeItem("sluice.apiKey");
  notice(key ? "API key saved in this browser." : "API key forgotten.");
  if (current) loadHistory();
});
ui.keyClear.addEventListener("click", () => {
  ui.key.value = "";
  store.removeItem("sluice.apiKey");
  notice("API key forgotten.");
});

renderThreads();
loadHistory().then(() => {
  document.body.dataset.ready = "1";
  ui.prompt.focus();
});
