// The page: a chat, and documents dropped in, read with a progress bar, and asked about.
// Everything goes through the server's own API (README, "A page for long documents"); model output is
// shown as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  history: [],        // the chat's messages, {role, content}
  doc: null,          // the open document's card
  docReady: false,    // read and held: questions go to it
  answering: null,    // AbortController of the answer being streamed
  reading: null,      // AbortController of the reading being followed
};

// -- the API ----------------------------------------------------------------------------------------

function key() { return sessionStorage.getItem("selfextend-key") || ""; }

async function askForKey() {
  const dialog = $("key-dialog");
  $("key").value = "";
  dialog.showModal();
  await new Promise((done) => dialog.addEventListener("close", done, { once: true }));
  sessionStorage.setItem("selfextend-key", $("key").value.trim());
}

async function api(path, options = {}, retried = false) {
  const headers = { ...(options.headers || {}) };
  if (key()) headers.Authorization = `Bearer ${key()}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401 && !retried) {
    await askForKey();
    return api(path, options, true);
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function postJSON(path, body, signal) {
  return api(path, { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" }, signal });
}

// Server-sent events from a response: each event's data, parsed as JSON ("[DONE]" ends it).
async function events(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      onEvent(JSON.parse(data));
    }
  }
}

// -- shown to the user ------------------------------------------------------------------------------

function say(text) { $("status").textContent = text; }

function number(n) { return Number(n).toLocaleString("en-US"); }

function seconds(s) {
  if (s == null) return "unknown until one has been read here";
  if (s < 90) return `about ${Math.round(s)} s`;
  return `about ${Math.round(s / 60)} min`;
}

function bubble(role, text) {
  const item = document.createElement("li");
  item.className = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : role === "assistant" ? "Model" : "Error";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  item.append(who, body);
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return body;
}

function settings() {
  const chosen = {
    temperature: Number($("temperature").value),
    max_tokens: Math.max(1, Math.round(Number($("max-tokens").value))),
  };
  const group = $("group").value, window_ = $("window").value;
  if (group || window_) {
    chosen.selfextend = {};
    if (group) chosen.selfextend.group = Number(group);
    if (window_) chosen.selfextend.window = Number(window_);
  }
  return chosen;
}

// -- documents --------------------------------------------------------------------------------------

async function loadDocuments() {
  const list = (await (await api("/v1/documents")).json()).data;
  const items = $("documents");
  items.replaceChildren();
  $("no-documents").hidden = list.length > 0;
  for (const card of list) {
    const item = document.createElement("li");
    item.tabIndex = 0;
    item.dataset.id = card.id;
    if (state.doc && state.doc.id === card.id) item.className = "open";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = card.name;
    const facts = document.createElement("span");
    facts.className = "facts";
    facts.textContent = `${number(card.tokens)} tokens${card.cached ? " · opens at once" : ""}`;
    item.append(name, facts);
    const open = () => showDocument(card);
    item.addEventListener("click", open);
    item.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
    items.append(item);
  }
}

async function upload(file) {
  say(`Giving the server ${file.name}...`);
  try {
    const response = await api(`/v1/documents?name=${encodeURIComponent(file.name)}`, {
      method: "POST",
      body: file,
      headers: { "Content-Type": file.type || "application/octet-stream" },
    });
    const card = await response.json();
    say("");
    showDocument(card);
    loadDocuments();
  } catch (error) {
    say(`Could not take ${file.name}: ${error.message}`);
  }
}

function fact(list, term, value) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  list.append(dt, dd);
}

function describePlan(plan) {
  if (!plan) return "";
  const setting = plan.group > 1 ? `SelfExtend G=${plan.group} W=${number(plan.window)} (${plan.schedule})` : "within the training context";
  return `${setting}, ${plan.kv_type} KV cache`;
}

function showDocument(card) {
  stopReading();
  state.doc = card;
  state.docReady = false;
  $("document-panel").hidden = false;
  $("doc-name").textContent = card.name;
  const facts = $("doc-facts");
  facts.replaceChildren();
  fact(facts, "Tokens", number(card.tokens));
  if (card.fits) {
    fact(facts, "Reading", describePlan(card.plan));
    fact(facts, "Memory", `${(card.kv_bytes / 2 ** 20).toFixed(0)} MiB of KV cache`);
    fact(facts, "Time", card.cached ? "none: it is in the disk cache" : seconds(card.estimate_seconds));
  }
  const note = $("doc-note");
  note.hidden = card.fits;
  note.textContent = card.fits ? "" : card.error.message;
  $("doc-read").hidden = !card.fits;
  $("doc-read").textContent = card.cached ? "Open it" : "Read it";
  $("doc-cancel").hidden = true;
  $("reading").hidden = true;
  $("input-label").textContent = "Message";
  for (const item of $("documents").children) item.classList.toggle("open", item.dataset.id === card.id);
  if (card.reading) readDocument();  // another tab is reading it: follow
}

function closeDocument() {
  stopReading();
  state.doc = null;
  state.docReady = false;
  $("document-panel").hidden = true;
  $("input-label").textContent = "Message";
  $("input").placeholder = "Ask anything (Enter sends, Shift+Enter for a new line)";
  for (const item of $("documents").children) item.classList.remove("open");
}

function stopReading() {
  if (state.reading) state.reading.abort();
  state.reading = null;
}

function showProgress(event) {
  const bar = $("doc-progress");
  bar.max = event.total;
  bar.value = event.done;
  const rate = event.tokens_per_second ? ` · ${number(Math.round(event.tokens_per_second))} tok/s` : "";
  const left = event.seconds_left != null ? ` · ${seconds(event.seconds_left)} left` : "";
  $("doc-status").textContent = `${number(event.done)} of ${number(event.total)} tokens${rate}${left}`;
}

function documentReady(event) {
  const bar = $("doc-progress");
  bar.max = event.total;
  bar.value = event.total;
  const how = { read: `Read in ${event.seconds} s.`, disk: "Opened from the disk cache.", memory: "Already read." };
  $("doc-status").textContent = `${how[event.source] || "Ready."} Ask about it below.`;
  state.docReady = true;
  $("doc-read").hidden = true;
  $("input-label").textContent = `Question about ${state.doc.name}`;
  $("input").placeholder = `Ask about ${state.doc.name}`;
  $("input").focus();
}

async function readDocument() {
  const card = state.doc;
  if (!card) return;
  const controller = new AbortController();
  state.reading = controller;
  $("reading").hidden = false;
  $("doc-read").hidden = true;
  $("doc-cancel").hidden = false;
  $("doc-status").textContent = "Waiting for a slot...";
  try {
    const response = await postJSON(`/v1/documents/${card.id}/read`, {}, controller.signal);
    await events(response, (event) => {
      if (event.state === "reading") showProgress(event);
      else if (event.state === "ready") documentReady(event);
      else if (event.state === "failed") $("doc-status").textContent = `Reading failed: ${event.error.message}`;
      else if (event.state === "cancelled") $("doc-status").textContent = "Reading cancelled.";
    });
  } catch (error) {
    if (error.name !== "AbortError") $("doc-status").textContent = `Reading failed: ${error.message}`;
    else $("doc-status").textContent = "Reading cancelled.";
  } finally {
    if (state.reading === controller) state.reading = null;
    $("doc-cancel").hidden = true;
    if (!state.docReady && state.doc === card) $("doc-read").hidden = false;
    loadDocuments();
  }
}

// -- asking -----------------------------------------------------------------------------------------

async function send(text) {
  const onDocument = state.doc && state.docReady;
  bubble("user", text);
  const out = bubble("assistant", "");
  const controller = new AbortController();
  state.answering = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  const body = { ...settings(), stream: true };
  if (onDocument) {
    body.messages = [{ role: "user", content: text }];
    body.document = state.doc.id;
    body.max_tokens = Math.min(body.max_tokens, 256);
    delete body.selfextend;
  } else {
    state.history.push({ role: "user", content: text });
    body.messages = state.history;
  }
  let answer = "";
  try {
    const response = await postJSON("/v1/chat/completions", body, controller.signal);
    await events(response, (event) => {
      if (event.error) throw new Error(event.error.message);
      for (const choice of event.choices || []) {
        if (choice.delta && choice.delta.content) {
          answer += choice.delta.content;
          out.textContent = answer;
        }
      }
    });
    say("");
  } catch (error) {
    if (error.name === "AbortError") say("Stopped.");
    else { out.parentElement.className = "error"; out.textContent = error.message; }
  } finally {
    if (!onDocument) state.history.push({ role: "assistant", content: answer });
    state.answering = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function stopAnswer() {
  if (state.answering) state.answering.abort();
}

function newConversation() {
  stopAnswer();
  state.history = [];
  $("messages").replaceChildren();
  closeDocument();
  say("");
  $("input").focus();
}

// -- wiring -----------------------------------------------------------------------------------------

function wireDrop() {
  const drop = $("drop");
  const picker = $("file");
  drop.addEventListener("click", () => picker.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); picker.click(); } });
  picker.addEventListener("change", () => { if (picker.files.length) upload(picker.files[0]); picker.value = ""; });
  for (const kind of ["dragenter", "dragover"]) {
    drop.addEventListener(kind, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
  });
}

function wireAsk() {
  const input = $("input");
  $("ask").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text || state.answering) return;
    input.value = "";
    send(text);
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") stopAnswer(); });
  $("stop").addEventListener("click", stopAnswer);
  $("new-chat").addEventListener("click", newConversation);
}

async function start() {
  wireDrop();
  wireAsk();
  $("doc-read").addEventListener("click", readDocument);
  $("doc-cancel").addEventListener("click", stopReading);
  $("doc-close").addEventListener("click", closeDocument);
  $("open-settings").addEventListener("click", () => $("settings").showModal());
  try {
    const models = (await (await api("/v1/models")).json()).data;
    $("model").textContent = models.length ? models[0].id : "";
    const status = await (await api("/v1/status")).json();
    if (status.kv_type) $("kv-type").textContent = status.kv_type;
    await loadDocuments();
  } catch (error) {
    say(`The server did not answer: ${error.message}`);
  }
}

start();
