// A real EventSource client (the npm `eventsource` package) for tests/test_eventsource_client.py.
//
// Usage: node resume.mjs <url> <browser|package>
// Prints one JSON object a line: {"type": "request", "lastEventId"} before each
// connection, "open", "error", and {"type": "e" | "gap", "id", "data"} per event.
// It reconnects by itself, as any EventSource does; it exits when stdin closes.
//
// "browser" sends Last-Event-ID as its UTF-8 bytes, as browsers do. fetch() takes a
// header value as a byte string (one character per byte, none above U+00FF), so the
// package's own way ("package") sends Latin-1 and cannot send an id beyond U+00FF.
import { EventSource } from "eventsource";

const [url, mode] = process.argv.slice(2);
const print = (record) => process.stdout.write(JSON.stringify(record) + "\n");

function recordingFetch(input, init) {
  const lastEventId = init.headers["Last-Event-ID"];
  print({ type: "request", lastEventId: lastEventId ?? null });
  const headers = { ...init.headers };
  if (mode === "browser" && lastEventId !== undefined) {
    headers["Last-Event-ID"] = Buffer.from(lastEventId, "utf8").toString("latin1");
  }
  return fetch(input, { ...init, headers });
}

const source = new EventSource(url, { fetch: recordingFetch });
source.onopen = () => print({ type: "open" });
source.onerror = (event) => print({ type: "error", message: event.message ?? null, readyState: source.readyState });
for (const name of ["e", "gap"]) {
  source.addEventListener(name, (event) => print({ type: name, id: event.lastEventId, data: event.data }));
}

process.stdin.on("end", () => {
  source.close();
  process.exit(0);
});
process.stdin.resume();
