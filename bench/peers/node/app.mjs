// better-sse on Node: the routes of bench/apps/common.py, so the same load client drives it.
//
// One channel per name made with createChannel(); a stream is createSession(req, res)
// registered on its channels; a broadcast is channel.broadcast(data, "bench", {eventId}),
// which pushes to every session (each session serializes the event with JSON.stringify,
// better-sse's default). send_to a user is session.push on that user's session.
//
// Usage: node app.mjs PORT  (BENCH_HEARTBEAT: keep-alive interval in seconds)

import http from "node:http";
import { readFileSync } from "node:fs";
import { createChannel, createSession } from "better-sse";

const port = Number(process.argv[2] ?? 8000);
const heartbeatMs = Number(process.env.BENCH_HEARTBEAT ?? "15") * 1000;
const channels = new Map();
const users = new Map();
let connected = 0;
let published = 0;
let nextId = 1;

// process.hrtime reads CLOCK_MONOTONIC, the clock of Python's time.monotonic().
const monotonic = () => Number(process.hrtime.bigint()) / 1e9;

const channelOf = (name) => {
  let channel = channels.get(name);
  if (channel === undefined) {
    channel = createChannel();
    channels.set(name, channel);
  }
  return channel;
};

const broadcast = (name, data) => {
  const channel = channels.get(name);
  if (channel !== undefined) channel.broadcast(data, "bench", { eventId: String(nextId++) });
};

const sendToUser = (user, data) => {
  const session = users.get(user);
  if (session === undefined) return false;
  session.push(data, "bench", String(nextId++));
  return true;
};

// Between two publishes: wait `interval` seconds, or let the loop run now and then when it is 0.
const pace = (interval, k) => {
  if (interval > 0) return new Promise((resolve) => setTimeout(resolve, interval * 1000));
  if (k % 64 === 63) return new Promise((resolve) => setImmediate(resolve));
  return null;
};

const publish = async (channel, n, interval, size, start) => {
  const pad = "x".repeat(size);
  for (let k = 0; k < n; k++) {
    broadcast(channel, { t: monotonic(), i: start + k, p: pad });
    published++;
    const wait = pace(interval, k);
    if (wait !== null) await wait;
  }
};

const publishUsers = async (n, count, interval, size, start) => {
  const pad = "x".repeat(size);
  for (let k = 0; k < n; k++) {
    const user = String(k % count);
    const data = { t: monotonic(), i: start + k, p: pad };
    if (k % 2) sendToUser(user, data);
    else broadcast(`user:${user}`, data);
    const wait = pace(interval, k);
    if (wait !== null) await wait;
  }
};

const pageSize = 4096;
const rss = () => Number(readFileSync("/proc/self/statm", "utf8").split(" ")[1]) * pageSize;

const stats = () => {
  const cpu = process.cpuUsage();
  return {
    clients: connected,
    rss: rss(),
    heap_used: process.memoryUsage().heapUsed,
    gc_full_pauses: [],
    cpu: (cpu.user + cpu.system) / 1e6,
    published,
    pid: process.pid,
  };
};

const json = (res, value) => {
  const body = JSON.stringify(value);
  res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  res.end(body);
};

const number = (params, name, fallback) => (params.has(name) ? Number(params.get(name)) : fallback);

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, "http://127.0.0.1");
  const params = url.searchParams;
  if (req.method === "GET" && url.pathname === "/sse") {
    const session = await createSession(req, res, { keepAlive: heartbeatMs });
    const names = params.getAll("channel");
    for (const name of names.length ? names : ["bench"]) channelOf(name).register(session);
    const user = params.get("user");
    if (user !== null) users.set(user, session);
    connected++;
    session.once("disconnected", () => {
      connected--;
      if (user !== null && users.get(user) === session) users.delete(user);
    });
    return;
  }
  if (req.method === "POST" && url.pathname === "/publish") {
    const n = number(params, "n", 1);
    const interval = number(params, "interval", 0);
    publish(params.get("channel") ?? "bench", n, interval, number(params, "size", 64), number(params, "start", 0));
    return json(res, { ok: true });
  }
  if (req.method === "POST" && url.pathname === "/publish_users") {
    const n = number(params, "n", 1);
    const count = number(params, "users", 1);
    publishUsers(n, count, number(params, "interval", 0), number(params, "size", 64), number(params, "start", 0));
    return json(res, { ok: true });
  }
  if (url.pathname === "/stats") {
    if (params.get("collect") === "1" && global.gc) global.gc();
    return json(res, stats());
  }
  if (url.pathname === "/reset") return json(res, { ok: true });
  res.writeHead(404);
  res.end();
});

server.keepAliveTimeout = 60_000;
server.listen(port, "127.0.0.1", 8192);
process.on("SIGTERM", () => process.exit(0));
