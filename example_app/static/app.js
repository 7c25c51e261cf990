// The example page: one EventSource carries every channel (browsers allow about
// six HTTP/1.1 connections per origin, so one stream per feature would not scale).
"use strict";

const CHANNELS = ["dashboard:stats", "dashboard:orders", "dashboard:alerts", "document:welcome"];
const EVENTS = [
  "initialState", "notification", "unreadCount", "statsUpdate", "newOrder", "alert",
  "userJoined", "documentChanged", "taskProgress", "taskComplete", "announcement", "gap", "message",
];

window.sseLog = [];
window.sseSource = null;
let reloads = 0;

const $ = (id) => document.getElementById(id);

function item(text, key) {
  const li = document.createElement("li");
  li.textContent = text;
  if (key !== undefined) li.dataset.key = String(key);
  return li;
}

function prepend(listId, li) {
  const list = $(listId);
  if (li.dataset.key && list.querySelector(`li[data-key="${li.dataset.key}"]`)) return;
  list.prepend(li);
}

function setStatus(text) {
  const el = $("connection-status");
  el.textContent = text;
  el.className = "badge " + text;
}

function notificationItem(n) {
  const li = item(`${n.title}${n.body ? " — " + n.body : ""}`, n.id);
  if (!n.read) li.classList.add("unread");
  return li;
}

function renderStats(s) {
  const when = s.updatedAt ? new Date(s.updatedAt).toLocaleTimeString() : "";
  $("dashboard-stats").textContent =
    `Orders: ${s.orders} · Revenue: $${Number(s.revenue).toFixed(2)} · Connections: ${s.connections} · updated ${when}`;
}

function orderItem(o) {
  return item(`#${o.id} ${o.customer} — $${Number(o.total).toFixed(2)}`, o.id);
}

function changeItem(c) {
  return item(`${c.userId} changed: ${c.changes}`);
}

function renderState(state) {
  $("notifications").replaceChildren(...state.notifications.slice().reverse().map(notificationItem));
  $("unread-count").textContent = String(state.unreadCount);
  renderStats(state.stats);
  $("orders").replaceChildren(...state.orders.slice().reverse().map(orderItem));
  $("document-events").replaceChildren(...state.document.changes.slice().reverse().map(changeItem));
}

async function reloadState() {
  const response = await fetch("/api/state", { credentials: "same-origin" });
  if (!response.ok) return null;
  const state = await response.json();
  renderState(state);
  return state;
}

const handlers = {
  initialState: renderState,
  notification: (n) => prepend("notifications", notificationItem({ ...n, read: false })),
  unreadCount: ({ count }) => {
    $("unread-count").textContent = String(count);
    if (count === 0) $("notifications").querySelectorAll("li.unread").forEach((li) => li.classList.remove("unread"));
  },
  statsUpdate: renderStats,
  newOrder: (o) => prepend("orders", orderItem(o)),
  alert: (a) => prepend("announcements", item(`alert: ${a.message ?? JSON.stringify(a)}`)),
  userJoined: (u) => prepend("document-events", item(`${u.name} joined`)),
  documentChanged: (c) => prepend("document-events", changeItem(c)),
  taskProgress: (t) => {
    $("task-progress").value = t.percent;
    $("task-status").textContent = `running ${t.current}/${t.total}`;
  },
  taskComplete: () => {
    $("task-progress").value = 100;
    $("task-status").textContent = "complete";
  },
  announcement: (a) => prepend("announcements", item(`[${a.priority}] ${a.title}${a.message ? " — " + a.message : ""}`)),
  // Events were missed and history no longer covers them: reload the state.
  gap: async () => {
    await reloadState();
    reloads += 1;
    $("reload-count").textContent = String(reloads);
    $("reload-notice").hidden = false;
  },
  message: () => {},
};

function connect() {
  const query = CHANNELS.map((c) => "channel=" + encodeURIComponent(c)).join("&");
  const source = new EventSource("/sse/subscribe?" + query, { withCredentials: true });
  window.sseSource = source;
  setStatus("connecting");
  source.onopen = () => setStatus("open");
  // EventSource reconnects by itself after a dropped stream (readyState CONNECTING);
  // it gives up for good on a non-200 answer (readyState CLOSED).
  source.onerror = () => setStatus(source.readyState === EventSource.CLOSED ? "closed" : "connecting");
  for (const type of EVENTS) {
    source.addEventListener(type, (event) => {
      let data = event.data;
      try { data = JSON.parse(event.data); } catch { /* not JSON: keep the text */ }
      window.sseLog.push({ type, id: event.lastEventId, data });
      handlers[type](data);
    });
  }
}

async function post(url, body) {
  const response = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body ?? {}),
  });
  return response.ok ? response.json() : null;
}

// -- The assistant: a run, followed by an EventSource of its own -----------------------
//
// The run's id is in the address (#run=<id>): a reload, or the address opened in another
// tab, follows the same run. What this tab has rendered of a run is kept in
// sessionStorage as one record, {text, lastId, status}, rewritten with each token as it
// is shown: the text on screen is always exactly the tokens up to and including lastId.
// After a reload the page shows that text again and reconnects with
// ?last_event_id=<lastId>, and the server replays exactly the events after that id: no
// token is lost (every one after lastId comes) and none is doubled (none up to it comes
// again). The query is needed because a new page's EventSource has no Last-Event-ID of
// its own; within one page, its automatic reconnects send the header, which wins over
// the query. A tab with no record (a new tab) has rendered nothing: it follows the run
// from its start. The run ends with one `end` event ({status: done|failed|cancelled|
// lost}) that reaches every viewer: then the page closes its EventSource.

window.runLog = [];
window.runSource = null;
let followed = null;

function runIdFromAddress() {
  const match = /^#run=([A-Za-z0-9][A-Za-z0-9_.:-]*)$/.exec(location.hash);
  return match ? match[1] : null;
}

function runRecord(runId) {
  try {
    const saved = JSON.parse(sessionStorage.getItem("run:" + runId));
    if (saved && typeof saved.text === "string") return saved;
  } catch { /* not ours: start afresh */ }
  return { text: "", lastId: "", status: null };
}

function setAssistantStatus(status) {
  const el = $("assistant-status");
  el.textContent = status;
  el.className = "badge " + status;
  $("stop").disabled = status !== "running";
}

function follow(runId) {
  if (window.runSource) window.runSource.close();
  window.runSource = null;
  followed = runId;
  const record = runRecord(runId);
  const save = () => sessionStorage.setItem("run:" + runId, JSON.stringify(record));
  $("assistant-answer").textContent = record.text;
  if (record.status) { // this tab saw the end already
    setAssistantStatus(record.status);
    return;
  }
  setAssistantStatus("running");
  const query = record.lastId ? "?last_event_id=" + encodeURIComponent(record.lastId) : "";
  const source = new EventSource(`/sse/runs/${encodeURIComponent(runId)}${query}`, { withCredentials: true });
  window.runSource = source;
  source.addEventListener("token", (event) => {
    const data = JSON.parse(event.data);
    window.runLog.push({ type: "token", id: event.lastEventId, data });
    record.text += data.text;
    record.lastId = event.lastEventId;
    save();
    $("assistant-answer").textContent = record.text;
  });
  source.addEventListener("end", (event) => {
    const data = JSON.parse(event.data);
    window.runLog.push({ type: "end", id: event.lastEventId, data });
    source.close(); // the run is over: no reconnect
    record.status = data.status;
    record.lastId = event.lastEventId;
    save();
    setAssistantStatus(data.status);
  });
  // 403 (not this user's run) or 404 (unknown, or ended longer ago than the server keeps
  // runs): EventSource gives up for good. Dropped streams reconnect by themselves.
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED && followed === runId && !record.status) {
      setAssistantStatus("unavailable");
    }
  };
}

async function ask(prompt) {
  setAssistantStatus("starting");
  const started = await post("/api/assistant", { prompt });
  if (started === null) {
    setAssistantStatus("refused");
    return;
  }
  location.hash = "run=" + started.runId; // hashchange follows it
}

let notes = 0;
const CUSTOMERS = ["Ada", "Grace", "Linus", "Guido", "Barbara", "Ken"];

function wireButtons() {
  $("send-notification").onclick = () => {
    notes += 1;
    post("/api/notifications", { title: `Notification ${notes}`, body: "Sent from this page" });
  };
  $("mark-read").onclick = () => post("/api/notifications/read");
  $("new-order").onclick = () =>
    post("/api/orders", {
      total: Math.round(Math.random() * 20000) / 100,
      customer: CUSTOMERS[Math.floor(Math.random() * CUSTOMERS.length)],
    });
  $("edit-document").onclick = () => post("/api/documents/welcome/edit", { changes: `line ${Date.now() % 1000} edited` });
  $("start-task").onclick = () => {
    $("task-progress").value = 0;
    $("task-status").textContent = "starting";
    post("/api/tasks", { items: 10 });
  };
  $("assistant-form").onsubmit = (event) => {
    event.preventDefault();
    ask($("prompt").value);
  };
  // Any tab may stop the run: its end event reaches every tab that follows it.
  $("stop").onclick = () => { if (followed) post(`/sse/runs/${encodeURIComponent(followed)}/cancel`); };
}

async function main() {
  // Operator commands address this server, wherever it runs.
  document.querySelectorAll("[data-origin]").forEach((el) => { el.textContent = location.origin; });
  wireButtons();
  const state = await reloadState();
  if (state === null) {
    $("signin-form").hidden = false;
    $("account").hidden = true;
    setStatus("closed");
    return;
  }
  $("signin-form").hidden = true;
  $("account").hidden = false;
  $("signed-in-as").textContent = state.user;
  connect();
  window.addEventListener("hashchange", () => {
    const runId = runIdFromAddress();
    if (runId && runId !== followed) follow(runId);
  });
  const runId = runIdFromAddress();
  if (runId) follow(runId);
}

main();
