// The page: a chat, and documents dropped in, read with a progress bar, and asked about.
// Everything goes through the server's own API (README, "A page for long documents"). A model's text is
// never parsed as HTML: answers are drawn from a small Markdown subset as elements made one by one, each
// piece of text set as textContent and each link checked to be http(s).
// The browser keeps the settings, the conversations (the chat's, and each document's questions) and the
// open document in localStorage, so a reload or a closed tab loses nothing; the API key stays in
// sessionStorage (gone with the tab).
"use strict";

const $ = (id) => document.getElementById(id);
const CHAT = "chat";  // the plain chat's conversation; a document's is kept under its id
const DEMO_MODEL = "SmolLM2-135M-Instruct.Q4_1";  // the bundled model's id (the stem of its file)
const state = {
  threads: {},        // conversation key -> its messages, {role: "user" | "assistant" | "error", content, meta}
  doc: null,          // the open document's card
  docReady: false,    // read and held: questions go to it
  answering: null,    // AbortController of the answer being streamed
  answeringKey: null, // the conversation it goes to
  reading: null,      // AbortController of the reading this tab follows
  cards: [],          // the documents as last listed
  poll: 0,            // timer of the next listing
  declined: null,     // id of the document whose reading this tab cancelled: not followed again
};
const views = new WeakMap();  // message -> the list item showing it (an answer repaints as it streams)
const dirty = new Set();      // messages to repaint at the next frame
// Tabs of this browser tell each other when the documents change (an upload, a deletion, a reading
// begun or ended), so each lists them at once; other browsers see it at the next listing.
const tabs = "BroadcastChannel" in window ? new BroadcastChannel("selfextend-documents") : null;

// -- kept in the browser ----------------------------------------------------------------------------

const STORE = "selfextend-page";
const SETTINGS = ["temperature", "max-tokens", "group", "window"];
const KEPT = 200;  // messages kept a conversation

function kept() {
  try { return JSON.parse(localStorage.getItem(STORE)) || {}; } catch (_) { return {}; }
}

// Each change is written into what is stored now, so two tabs writing different conversations keep both.
function keep(change) {
  const now = kept();
  change(now);
  try { localStorage.setItem(STORE, JSON.stringify(now)); } catch (_) { /* full or refused: the page goes on */ }
}

function keepThread(key) {
  keep((now) => {
    now.threads = now.threads || {};
    const messages = (state.threads[key] || []).filter((m) => m.content || m.role !== "assistant");
    if (messages.length) now.threads[key] = messages.slice(-KEPT);
    else delete now.threads[key];
  });
}

function keepOpen() {
  const open = state.doc ? { id: state.doc.id, read: state.docReady || state.reading !== null } : null;
  keep((now) => { now.open = open; });
}

function keepSettings() {
  keep((now) => { now.settings = Object.fromEntries(SETTINGS.map((id) => [id, $(id).value])); });
}

// What the last visit left: the settings put back in the form, the conversations; returns the document
// that was open ({id, read}) or null.
function restore() {
  const now = kept();
  for (const [id, value] of Object.entries(now.settings || {})) if (SETTINGS.includes(id)) $(id).value = value;
  restoreThreads(now);
  return now.open && typeof now.open.id === "string" ? now.open : null;
}

function restoreThreads(now) {
  const roles = ["user", "assistant", "error"];
  for (const [key, messages] of Object.entries(now.threads || {})) {
    if (!Array.isArray(messages)) continue;
    state.threads[key] = messages.filter((m) => m && roles.includes(m.role) && typeof m.content === "string");
  }
}

// Another tab changed what is kept: its conversations replace this tab's, except one being answered here.
function takeThreads() {
  const answering = state.answering ? state.answeringKey : null;
  const mine = state.threads[answering];
  state.threads = {};
  restoreThreads(kept());
  if (answering !== null) state.threads[answering] = mine;
  if (threadKey() !== answering) showThread();
}

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

// -- Markdown ---------------------------------------------------------------------------------------
// Paragraphs, **bold**, *italic*, `code`, fenced code, lists, headings (as bold lines) and links to
// http(s) addresses; anything else stays the text it is.

const FENCE = /^\s*```/;
const ITEM = /^\s*([-*+]|\d{1,4}[.)])\s+(.*)$/;
const HEADING = /^\s{0,3}#{1,6}\s+(.*)$/;
const INLINE = new RegExp([
  "`([^`]+)`",                                          // 1: code
  "\\*\\*(.+?)\\*\\*",                                  // 2: bold
  "(?<![\\w*])\\*(?![\\s*])(.+?)(?<!\\s)\\*(?![\\w*])", // 3: italic
  "(?<!\\w)_(?![\\s_])(.+?)(?<!\\s)_(?!\\w)",           // 4: italic
  "\\[([^\\]]+)\\]\\(([^\\s)]+)\\)",                    // 5, 6: a link
  "(https?://[^\\s<>]*[^\\s<>.,;:!?)\"'])",             // 7: a bare address
].join("|"), "g");

function element(tag, text) {
  const made = document.createElement(tag);
  if (text != null) made.textContent = text;
  return made;
}

function markdown(text) {
  const out = document.createDocumentFragment();
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    if (!lines[i].trim()) i += 1;
    else if (FENCE.test(lines[i])) i = codeBlock(lines, i, out);
    else if (ITEM.test(lines[i])) i = list(lines, i, out);
    else if (HEADING.test(lines[i])) i = heading(lines, i, out);
    else i = paragraph(lines, i, out);
  }
  return out;
}

function codeBlock(lines, i, out) {
  const code = [];
  for (i += 1; i < lines.length && !FENCE.test(lines[i]); i += 1) code.push(lines[i]);
  const pre = element("pre");
  pre.append(element("code", code.join("\n")));
  out.append(pre);
  return i + 1;  // past the closing fence (a fence still streaming runs to the end)
}

function list(lines, i, out) {
  const ordered = (line) => /^\s*\d/.test(line);
  const kind = ordered(lines[i]);
  const made = element(kind ? "ol" : "ul");
  if (kind) made.start = parseInt(lines[i].match(ITEM)[1], 10);
  let item = null;
  for (; i < lines.length; i += 1) {
    const found = lines[i].match(ITEM);
    if (found && ordered(lines[i]) === kind) {
      item = element("li");
      inline(found[2], item);
      made.append(item);
    } else if (item && !found && /^\s+\S/.test(lines[i])) {  // an item's indented second line
      item.append(element("br"));
      inline(lines[i].trim(), item);
    } else break;
  }
  out.append(made);
  return i;
}

function heading(lines, i, out) {
  const line = element("p");
  line.className = "heading";
  const strong = element("strong");
  inline(lines[i].match(HEADING)[1], strong);
  line.append(strong);
  out.append(line);
  return i + 1;
}

function paragraph(lines, i, out) {
  const made = element("p");
  const ends = (line) => !line.trim() || FENCE.test(line) || ITEM.test(line) || HEADING.test(line);
  for (let first = true; i < lines.length && (first || !ends(lines[i])); i += 1, first = false) {
    if (!first) made.append(element("br"));
    inline(lines[i], made);
  }
  out.append(made);
  return i;
}

function inline(text, parent) {
  let at = 0;
  for (const found of text.matchAll(INLINE)) {
    if (found.index > at) parent.append(text.slice(at, found.index));
    parent.append(span(found));
    at = found.index + found[0].length;
  }
  if (at < text.length) parent.append(text.slice(at));
}

function span([whole, code, bold, star, under, label, href, bare]) {
  if (code) return element("code", code);
  if (bold || star || under) {
    const made = element(bold ? "strong" : "em");
    inline(bold || star || under, made);
    return made;
  }
  return bare ? link(bare, bare, whole) : link(label, href, whole);
}

function link(label, href, whole) {
  let url = null;
  try { url = new URL(href); } catch (_) { /* not an address: left as text */ }
  if (!url || (url.protocol !== "http:" && url.protocol !== "https:")) return document.createTextNode(whole);
  const made = element("a", label);
  made.href = url.href;
  made.rel = "noopener noreferrer";
  made.target = "_blank";
  return made;
}

// -- shown to the user ------------------------------------------------------------------------------

function say(text) { $("status").textContent = text; }

function number(n) { return Number(n).toLocaleString("en-US"); }

function duration(s) { return s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`; }

const WHO = { user: "You", assistant: "Model", error: "Error" };

function bubble(message) {
  const item = element("li");
  const who = element("span");
  who.className = "who";
  const body = element("div");
  body.className = "text";
  const tools = element("div");
  tools.className = "tools";
  const meta = element("span");
  meta.className = "meta";
  const copy = element("button", "Copy");
  copy.type = "button";
  copy.className = "copy quiet";
  copy.setAttribute("aria-label", "Copy the answer");
  copy.addEventListener("click", () => copyAnswer(message, copy));
  tools.append(meta, copy);
  item.append(who, body, tools);
  views.set(message, item);
  paint(message);
  $("messages").append(item);
  return item;
}

function paint(message) {
  const item = views.get(message);
  if (!item) return;
  item.className = message.role;
  item.querySelector(".who").textContent = WHO[message.role];
  const body = item.querySelector(".text");
  if (message.role === "assistant") body.replaceChildren(markdown(message.content));
  else body.textContent = message.content;
  item.querySelector(".meta").textContent = message.meta || "";
  item.querySelector(".tools").hidden = message.role !== "assistant" || !message.content;
}

// A streamed answer is drawn once a frame, however many tokens came in it.
function repaint(message) {
  if (!dirty.size) requestAnimationFrame(flush);
  dirty.add(message);
}

function flush() {
  const following = atEnd();
  for (const message of dirty) paint(message);
  dirty.clear();
  if (following) toEnd();
}

// The messages scroll inside their list on a wide screen, with the whole page on a phone.
function scroller() {
  const list = $("messages");
  return list.scrollHeight > list.clientHeight + 1 ? list : document.scrollingElement;
}

function atEnd() {
  const s = scroller();
  return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
}

function toEnd() {
  const s = scroller();
  s.scrollTop = s.scrollHeight;
}

async function copyAnswer(message, button) {
  try {
    await copyText(message.content);
    button.textContent = "Copied";
  } catch (_) {
    button.textContent = "Copy failed";
  }
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

// The clipboard API exists only on secure pages (https or this machine); elsewhere, a selection copied.
function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
  const area = element("textarea");
  area.value = text;
  document.body.append(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  return copied ? Promise.resolve() : Promise.reject(new Error("copy refused"));
}

function threadKey() { return state.doc ? state.doc.id : CHAT; }

function thread() {
  const key = threadKey();
  if (!state.threads[key]) state.threads[key] = [];
  return state.threads[key];
}

function showThread() {
  $("messages").replaceChildren();
  for (const message of thread()) bubble(message);
  toEnd();
}

// The input says where a question goes: to the chat, or to the open document once it is read.
function showTarget() {
  const doc = state.doc;
  let label = "Message";
  let hint = "Ask anything (Enter sends, Shift+Enter for a new line)";
  if (doc && state.docReady) [label, hint] = [`Question about ${doc.name}`, `Ask about ${doc.name}`];
  else if (doc && !doc.fits) [label, hint] = [`${doc.name} is too long for this server`, "Close the document to chat"];
  else if (doc) [label, hint] = [`Question about ${doc.name}, once it is read`, `Ask about ${doc.name} once it is read`];
  $("input-label").textContent = label;
  $("input").placeholder = hint;
  $("send").disabled = state.answering !== null || (doc !== null && !state.docReady);
}

function showModel(id) {
  $("model").textContent = id ? `Answers from ${id}` : "";
  $("model-note").hidden = id !== DEMO_MODEL || Boolean(kept().noteHidden);
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

// -- the documents list -----------------------------------------------------------------------------

function progress(reading) {
  if (!reading.total) return "reading: waiting for a slot";
  return `reading: ${Math.floor((100 * reading.done) / reading.total)}%`;
}

function listed(card) {
  const item = element("li");
  item.dataset.id = card.id;
  const pick = element("button");
  pick.type = "button";
  pick.className = "pick";
  const name = element("span", card.name);
  name.className = "name";
  const facts = element("span");
  facts.className = "facts";
  pick.append(name, facts);
  const now = () => state.cards.find((c) => c.id === card.id) || card;  // as last listed
  pick.addEventListener("click", () => openDocument(now(), true));
  const remove = element("button", "Delete");
  remove.type = "button";
  remove.className = "delete quiet";
  remove.setAttribute("aria-label", `Delete ${card.name}`);
  remove.addEventListener("click", () => deleteDocument(now()));
  item.append(pick, remove);
  paintListed(item, card);
  return item;
}

function paintListed(item, card) {
  const tail = card.reading ? ` · ${progress(card.reading)}` : card.cached ? " · opens at once" : "";
  item.querySelector(".facts").textContent = `${number(card.tokens)} tokens${tail}`;
  item.classList.toggle("reading", Boolean(card.reading));
  item.classList.toggle("open", Boolean(state.doc && state.doc.id === card.id));
}

// The list is drawn again only when its documents change; otherwise each item is brought up to date
// where it is (a keyboard's focus stays put).
async function loadDocuments() {
  const cards = (await (await api("/v1/documents")).json()).data;
  state.cards = cards;
  const items = $("documents");
  const same = cards.length === items.children.length && cards.every((c, i) => items.children[i].dataset.id === c.id);
  if (same) cards.forEach((card, i) => paintListed(items.children[i], card));
  else items.replaceChildren(...cards.map(listed));
  $("no-documents").hidden = cards.length > 0;
  followListed(cards);
  watchDocuments();
}

function followListed(cards) {
  const ids = new Set(cards.map((card) => card.id));
  for (const key of Object.keys(state.threads)) {
    if (key !== CHAT && !ids.has(key)) { delete state.threads[key]; keepThread(key); }
  }
  if (!state.doc) return;
  const now = cards.find((card) => card.id === state.doc.id);
  if (!now) closeDocument(`${state.doc.name} was deleted.`);
  else if (now.reading && !state.reading && !state.docReady && state.declined !== now.id) readDocument();  // another tab began it
}

// Listed again every 2 s while a reading this tab does not follow is under way, else every 30 s.
function watchDocuments() {
  clearTimeout(state.poll);
  const busy = state.cards.some((card) => card.reading && !(state.reading && state.doc && state.doc.id === card.id));
  state.poll = setTimeout(() => loadDocuments().catch(watchDocuments), busy ? 2000 : 30000);
}

function tell() {
  if (tabs) tabs.postMessage("documents");
}

function markListed(id, reading) {
  const card = state.cards.find((c) => c.id === id);
  const item = [...$("documents").children].find((li) => li.dataset.id === id);
  if (!card || !item) return;
  card.reading = reading;
  paintListed(item, card);
}

// -- a document -------------------------------------------------------------------------------------

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
    openDocument(card, true);
    $("input").focus();
    tell();
    loadDocuments();
  } catch (error) {
    say(`Could not take ${file.name}: ${error.message}`);
  }
}

async function deleteDocument(card) {
  if (!window.confirm(`Delete ${card.name} from the server? Its questions here go too.`)) return;
  try {
    await api(`/v1/documents/${encodeURIComponent(card.id)}`, { method: "DELETE" });
  } catch (error) {
    say(`Could not delete ${card.name}: ${error.message}`);
    return;
  }
  if (state.doc && state.doc.id === card.id) closeDocument();
  delete state.threads[card.id];
  keepThread(card.id);
  say(`Deleted ${card.name}.`);
  tell();
  loadDocuments();
}

function fact(list, term, value) {
  const dt = element("dt", term);
  const dd = element("dd", value);
  list.append(dt, dd);
  return dd;
}

function describePlan(plan) {
  if (!plan) return "";
  const setting = plan.group > 1 ? `SelfExtend G=${plan.group} W=${number(plan.window)} (${plan.schedule})` : "within the training context";
  return `${setting}, ${plan.kv_type} KV cache`;
}

function timeBefore(card) {
  if (card.cached) return "none: it is in the disk cache";
  if (card.estimate_seconds != null) return `about ${duration(card.estimate_seconds)}, at the speed of the last reading here`;
  return "estimated once the reading begins";
}

function showCard(card) {
  $("document-panel").hidden = false;
  $("doc-name").textContent = card.name;
  const facts = $("doc-facts");
  facts.replaceChildren();
  fact(facts, "Tokens", number(card.tokens));
  if (card.fits) {
    fact(facts, "Reading", describePlan(card.plan));
    fact(facts, "Memory", `${(card.kv_bytes / 2 ** 20).toFixed(0)} MiB of KV cache`);
    fact(facts, "Time", timeBefore(card)).id = "doc-time";
  }
  const note = $("doc-note");
  note.hidden = card.fits;
  note.textContent = card.fits ? "" : card.error.message;
  $("doc-read").hidden = !card.fits;
  $("doc-read").textContent = card.cached ? "Open it" : "Read it";
  $("doc-cancel").hidden = true;
  $("reading").hidden = true;
}

// Show a document and its questions; ``read``: open it at once (from memory or the disk cache when it
// has been read, else read it). A document another tab is reading is followed.
function openDocument(card, read) {
  const same = state.doc !== null && state.doc.id === card.id;
  if (same && (state.reading || state.docReady)) return;
  stopReading();
  state.doc = card;
  state.docReady = false;
  state.declined = null;
  showCard(card);
  showThread();
  showTarget();
  for (const item of $("documents").children) item.classList.toggle("open", item.dataset.id === card.id);
  if (card.fits && (read || card.reading)) readDocument();
  keepOpen();
}

function closeDocument(why = "") {
  stopReading();
  state.doc = null;
  state.docReady = false;
  $("document-panel").hidden = true;
  showThread();
  showTarget();
  for (const item of $("documents").children) item.classList.remove("open");
  keepOpen();
  say(why);
}

function stopReading() {
  if (state.reading) state.reading.abort();
  state.reading = null;
}

function cancelReading() {
  stopReading();
  state.declined = state.doc.id;
  $("doc-status").textContent = "Reading cancelled.";
  $("doc-cancel").hidden = true;
  $("doc-read").hidden = false;
  $("doc-read").focus();
  keepOpen();
  tell();
}

function setTime(text) {
  const time = $("doc-time");
  if (time) time.textContent = text;
}

function showProgress(card, event) {
  const bar = $("doc-progress");
  bar.max = event.total;
  bar.value = event.done;
  const rate = event.tokens_per_second ? ` · ${number(Math.round(event.tokens_per_second))} tok/s` : "";
  const left = event.seconds_left != null ? ` · about ${duration(event.seconds_left)} left` : "";
  const resumed = event.resumed > 0 && event.resumed < event.total ? ` (resumed at ${number(event.resumed)})` : "";
  $("doc-status").textContent = `${number(event.done)} of ${number(event.total)} tokens${resumed}${rate}${left}`;
  setTime(event.seconds_left != null ? `about ${duration(event.seconds_left)} left` : "estimated once a few parts are read");
  markListed(card.id, event);
}

function documentReady(card, event) {
  const bar = $("doc-progress");
  bar.max = event.total;
  bar.value = event.total;
  const how = { read: `Read in ${event.seconds} s.`, disk: "Opened from the disk cache.", memory: "Already read." };
  const time = { read: `read in ${event.seconds} s`, disk: "none: opened from the disk cache", memory: "none: already read" };
  $("doc-status").textContent = `${how[event.source] || "Ready."} Ask about it below.`;
  setTime(time[event.source] || "read");
  state.docReady = true;
  $("doc-read").hidden = true;
  markListed(card.id, null);
  showTarget();
  keepOpen();
  $("input").focus();
}

function onReading(card, event) {
  if (event.state === "reading") showProgress(card, event);
  else if (event.state === "ready") documentReady(card, event);
  else if (event.state === "failed") $("doc-status").textContent = `Reading failed: ${event.error.message}`;
  else if (event.state === "cancelled") $("doc-status").textContent = "Reading cancelled.";
}

async function readDocument() {
  const card = state.doc;
  if (!card || state.reading) return;
  const controller = new AbortController();
  const mine = () => state.reading === controller;  // not cancelled, nor another document opened
  state.reading = controller;
  $("reading").hidden = false;
  $("doc-read").hidden = true;
  $("doc-cancel").hidden = false;
  $("doc-status").textContent = "Waiting for a slot...";
  try {
    const response = await postJSON(`/v1/documents/${encodeURIComponent(card.id)}/read`, {}, controller.signal);
    tell();
    await events(response, (event) => { if (mine()) onReading(card, event); });
  } catch (error) {
    if (mine()) $("doc-status").textContent = `Reading failed: ${error.message}`;
  } finally {
    if (mine()) {
      state.reading = null;
      $("doc-cancel").hidden = true;
      $("doc-read").hidden = state.docReady;
    }
    tell();
    loadDocuments().catch(watchDocuments);
  }
}

// -- asking -----------------------------------------------------------------------------------------

function chatMessages(messages) {
  return messages.filter((m) => m.role !== "error" && m.content).map(({ role, content }) => ({ role, content }));
}

// Tokens and speed of an answer: tokens from the stream's usage, speed over the time from its first
// token to its last (the server's own timings when it sends them).
function speed(usage, clock, timings) {
  const tokens = usage.completion_tokens;
  const seconds = (performance.now() - clock.first) / 1000;
  let rate = timings && timings.predicted_per_second;
  if (rate == null && tokens > 1 && clock.first && seconds > 0) rate = (tokens - 1) / seconds;
  return `${number(tokens)} tokens${rate ? ` · ${rate.toFixed(1)} tok/s` : ""}`;
}

function received(reply, event, clock) {
  if (event.error) throw new Error(event.error.message);
  for (const choice of event.choices || []) {
    const text = choice.delta && choice.delta.content;
    if (!text) continue;
    if (!clock.first) clock.first = performance.now();
    reply.content += text;
  }
  if (event.usage) reply.meta = speed(event.usage, clock, event.timings);
  repaint(reply);
}

async function send(text) {
  const doc = state.docReady ? state.doc : null;
  const key = threadKey();
  const messages = thread();
  const asked = { role: "user", content: text };
  const reply = { role: "assistant", content: "" };
  const body = { ...settings(), stream: true, stream_options: { include_usage: true } };
  body.messages = doc ? [asked] : [...chatMessages(messages), asked];
  if (doc) {
    body.document = doc.id;
    body.max_tokens = Math.min(body.max_tokens, 256);
    delete body.selfextend;
  }
  messages.push(asked, reply);
  bubble(asked);
  bubble(reply);
  toEnd();
  const controller = new AbortController();
  state.answering = controller;
  state.answeringKey = key;
  showTarget();
  $("stop").disabled = false;
  keepThread(key);
  const clock = { first: 0 };  // when the first token came
  try {
    const response = await postJSON("/v1/chat/completions", body, controller.signal);
    await events(response, (event) => received(reply, event, clock));
    say("");
  } catch (error) {
    if (error.name === "AbortError") say("Stopped.");
    else Object.assign(reply, { role: "error", content: error.message });
  } finally {
    state.answering = null;
    showTarget();
    $("stop").disabled = true;
    paint(reply);
    keepThread(key);
  }
}

function stopAnswer() {
  if (state.answering) state.answering.abort();
}

// Clears the conversation shown: the chat, or the open document's questions.
function newConversation() {
  stopAnswer();
  const key = threadKey();
  state.threads[key] = [];
  keepThread(key);
  showThread();
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
    if (state.doc && !state.docReady) {
      say(state.doc.fits ? `${state.doc.name} is not read yet: ask once it is, or close it to chat.` : "Close the document to chat.");
      return;
    }
    input.value = "";
    send(text);
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") stopAnswer();
    if ((e.ctrlKey || e.metaKey) && e.shiftKey && e.key.toLowerCase() === "o") {
      e.preventDefault();
      newConversation();
    }
  });
  $("stop").addEventListener("click", stopAnswer);
  $("new-chat").addEventListener("click", newConversation);
}

function wireRest() {
  $("doc-read").addEventListener("click", readDocument);
  $("doc-cancel").addEventListener("click", cancelReading);
  $("doc-close").addEventListener("click", () => closeDocument());
  $("open-settings").addEventListener("click", () => $("settings").showModal());
  $("settings-form").addEventListener("input", keepSettings);
  $("model-note-hide").addEventListener("click", () => {
    $("model-note").hidden = true;
    keep((now) => { now.noteHidden = true; });
  });
  if (tabs) tabs.addEventListener("message", () => loadDocuments().catch(watchDocuments));
  // an answer still streaming at a reload is kept as far as it came
  window.addEventListener("pagehide", () => { if (state.answering) keepThread(state.answeringKey); });
  window.addEventListener("storage", (e) => { if (e.key === STORE) takeThreads(); });
}

async function start() {
  wireDrop();
  wireAsk();
  wireRest();
  const open = restore();
  showThread();
  showTarget();
  try {
    const models = (await (await api("/v1/models")).json()).data;
    showModel(models.length ? models[0].id : "");
    const status = await (await api("/v1/status")).json();
    if (status.kv_type) $("kv-type").textContent = status.kv_type;
    await loadDocuments();
    const card = open && state.cards.find((c) => c.id === open.id);
    if (card) openDocument(card, open.read);
    else if (open) keepOpen();
  } catch (error) {
    say(`The server did not answer: ${error.message}`);
  }
}

start();
