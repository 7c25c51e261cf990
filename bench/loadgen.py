"""The load client: thousands of SSE connections on raw asyncio sockets, in its own process.

Each connection is one ``asyncio.Protocol`` (no task, no HTTP library): it sends a GET,
checks the status line, then scans what arrives for the ``"t":<publish time>,"i":<index>``
every benchmark payload carries. Times are ``time.monotonic()``, which every process of
the machine shares. Everything is bounded: connections by count, every wait by a deadline.

Usage: ``python -m bench.loadgen '<json spec>'``; prints one JSON object of results.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import socket
import statistics
import sys
import time
from array import array
from typing import Any

import httpx

_EVENT = re.compile(rb'"t":([0-9.e+-]+),"i":(\d+)')
_PING = b": ping"
CONNECT_CONCURRENCY = 256


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(wanted, hard), max(wanted, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Tally:
    """What every connection received, merged."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.worst: dict[int, float] = {}
        self.latencies = array("d")
        self.record = True
        self.first_recv = 0.0
        self.last_recv = 0.0
        self.pings = 0
        self.received = 0
        self.headers = 0
        self.refused = 0
        self.failed = 0
        self.closed = 0


class Stream(asyncio.Protocol):
    __slots__ = ("head", "request", "stalled", "tail", "tally", "transport")

    def __init__(self, tally: Tally, request: bytes, stalled: bool) -> None:
        self.tally = tally
        self.request = request
        self.stalled = stalled
        self.head: bytes | None = b""
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        tally = self.tally
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.head[: self.head.find(b"\r\n")]
            data = self.head[end + 4 :]
            self.head = None
            if b" 200 " not in status:
                tally.refused += 1
                assert self.transport is not None
                self.transport.close()
                return
            tally.headers += 1
            if self.stalled:
                assert self.transport is not None
                self.transport.pause_reading()
                return
        # Cut after the last complete line (some servers end lines with CRLF).
        end = data.rfind(b"\n") + 1
        if not end:
            self.tail += data
            return
        chunk = self.tail + data[:end] if self.tail else data[:end]
        self.tail = data[end:]
        now = time.monotonic()
        if not tally.first_recv:
            tally.first_recv = now
        tally.last_recv = now
        if _PING in chunk:
            tally.pings += chunk.count(_PING)
        counts, worst = tally.counts, tally.worst
        for stamp, index in _EVENT.findall(chunk):
            i = int(index)
            latency = now - float(stamp)
            counts[i] = counts.get(i, 0) + 1
            if latency > worst.get(i, 0.0):
                worst[i] = latency
            if tally.record:
                tally.latencies.append(latency)
            tally.received += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.tally.closed += 1


class Load:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.tally = Tally()
        self.transports: list[asyncio.BaseTransport] = []
        self.http = httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=60)

    async def open(self, paths: list[str], *, stalled: bool = False, deadline: float = 120.0) -> float:
        """Open one stream per path; return the seconds until every status line arrived."""
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        tally = self.tally
        before = tally.headers + tally.refused + tally.failed

        async def one(k: int, path: str) -> None:
            request = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nAccept: text/event-stream\r\n\r\n".encode()
            async with gate:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                # Spread the client ends over several loopback addresses: one has too few ports.
                sock.bind((f"127.0.0.{2 + k % 16}", 0))
                if stalled:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, (self.host, self.port))
                except OSError:
                    # A server too busy to accept (backlog full, connect timed out): counted.
                    sock.close()
                    tally.failed += 1
                    return
                transport, _ = await loop.create_connection(lambda: Stream(tally, request, stalled), sock=sock)
                self.transports.append(transport)

        started = time.monotonic()
        await asyncio.gather(*(one(k, p) for k, p in enumerate(paths)))
        await self.until(
            lambda: tally.headers + tally.refused + tally.failed - before >= len(paths), deadline, "status lines"
        )
        return time.monotonic() - started

    async def until(self, condition: Any, deadline: float, what: str) -> None:
        end = time.monotonic() + deadline
        while not condition():
            if time.monotonic() > end:
                raise TimeoutError(f"waited {deadline}s for {what}")
            await asyncio.sleep(0.005)

    async def stats(self, collect: bool = False) -> dict[str, Any]:
        response = await self.http.get("/stats", params={"collect": int(collect)})
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def wait_clients(self, count: int, deadline: float = 60.0) -> None:
        end = time.monotonic() + deadline
        while (await self.stats())["clients"] < count:
            if time.monotonic() > end:
                raise TimeoutError(f"the server did not report {count} clients in {deadline}s")
            await asyncio.sleep(0.05)

    async def post(self, path: str, **params: Any) -> float:
        sent = time.monotonic()
        response = await self.http.post(path, params=params)
        response.raise_for_status()
        return sent

    async def close(self) -> None:
        for transport in self.transports:
            transport.close()
        await self.http.aclose()


def quantiles(values: array[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)
    last = len(ordered) - 1
    return {
        "p50": ordered[round(last * 0.50)],
        "p99": ordered[round(last * 0.99)],
        "max": ordered[last],
    }


async def connect_idle(load: Load, spec: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    tally = load.tally
    n = len(paths)
    before = await load.stats(collect=True)
    connect_s = await load.open(paths)
    # Streams the server refused or never accepted are reported, not waited for.
    n = tally.headers
    await load.wait_clients(n)
    idle = await load.stats(collect=True)
    result: dict[str, Any] = {
        "clients": n,
        "refused": tally.refused + tally.failed,
        "connect_per_s": n / connect_s,
        "rss_per_conn": (idle["rss"] - before["rss"]) / n,
        "rss_idle": idle["rss"],
    }
    # Python apps count live objects, Node reports its JS heap.
    for key, name in (("gc_objects", "objects_per_conn"), ("heap_used", "heap_per_conn")):
        if key in idle:
            result[name] = (idle[key] - before[key]) / n
    return result


async def run_fanout(load: Load, spec: dict[str, Any]) -> dict[str, Any]:
    n, events, interval, singles = spec["clients"], spec["events"], spec["interval"], spec["singles"]
    tally = load.tally
    deadline = spec.get("deadline", 120.0)
    if spec.get("workers", 1) > 1:
        # Each worker counts only its own clients: publish until one event reaches them all.
        result = {"clients": n, "connect_per_s": n / await load.open(["/sse?channel=bench"] * n)}
        index = await wait_live(load, n, deadline)
    else:
        result = await connect_idle(load, spec, ["/sse?channel=bench"] * n)
        index = 0
    await load.post("/reset")
    cpu0 = (await load.stats())["cpu"]
    one = []
    for _ in range(singles):
        await load.post("/publish", n=1, start=index, size=spec["size"])
        await load.until(lambda i=index: tally.counts.get(i, 0) >= n, deadline, f"broadcast {index} to reach all")
        one.append(tally.worst[index])
        index += 1
    tally.latencies = array("d")
    first = index
    sent = await load.post("/publish", n=events, interval=interval, start=first, size=spec["size"])
    await load.until(
        lambda: all(tally.counts.get(i, 0) >= n for i in range(first, first + events)),
        deadline,
        "every event of the burst to reach every client",
    )
    elapsed = tally.last_recv - sent
    after = await load.stats()
    result.update(
        {
            "one_broadcast_s": sorted(one)[len(one) // 2] if one else 0.0,
            "events_per_s": n * events / elapsed,
            **{f"latency_{k}": v for k, v in quantiles(tally.latencies).items()},
            "gc_full_max": max(after["gc_full_pauses"], default=0.0),
            "gc_full_count": len(after["gc_full_pauses"]),
            "cpu_s": after["cpu"] - cpu0,
            "rss_end": after["rss"],
        }
    )
    return result


async def run_paced(load: Load, spec: dict[str, Any]) -> dict[str, Any]:
    """Broadcasts paced one at a time: each is published once the one before reached every
    subscriber, so each measures one broadcast to all, with no batching of events."""
    n, events = spec["clients"], spec["events"]
    tally = load.tally
    deadline = spec.get("deadline", 120.0)
    result = await connect_idle(load, spec, ["/sse?channel=bench"] * n)
    await load.post("/reset")
    cpu0 = (await load.stats())["cpu"]
    started = time.monotonic()
    reach = []
    for index in range(events):
        await load.post("/publish", n=1, start=index, size=spec["size"])
        await load.until(lambda i=index: tally.counts.get(i, 0) >= n, deadline, f"broadcast {index} to reach all")
        reach.append(tally.worst[index])
    elapsed = tally.last_recv - started
    after = await load.stats()
    result.update(
        {
            "events_per_s": n * events / elapsed,
            "one_broadcast_s": statistics.median(reach),
            **{f"latency_{k}": v for k, v in quantiles(tally.latencies).items()},
            "gc_full_max": max(after["gc_full_pauses"], default=0.0),
            "cpu_us_per_event": 1e6 * (after["cpu"] - cpu0) / (n * events),
        }
    )
    return result


async def wait_live(load: Load, n: int, deadline: float) -> int:
    """Publish warm-up events until one reaches all ``n`` streams; return the next free index."""
    tally = load.tally
    end = time.monotonic() + deadline
    index = 1_000_000
    while True:
        await load.post("/publish", n=1, start=index)
        try:
            await load.until(lambda i=index: tally.counts.get(i, 0) >= n, 0.5, "a warm-up event")
            return 0
        except TimeoutError:
            if time.monotonic() > end:
                raise
        index += 1


async def run_users(load: Load, spec: dict[str, Any]) -> dict[str, Any]:
    n, events = spec["clients"], spec["events"]
    tally = load.tally
    result = await connect_idle(load, spec, [f"/sse?channel=user:{k}&user={k}" for k in range(n)])
    cpu0 = (await load.stats())["cpu"]
    sent = await load.post("/publish_users", n=events, users=n, interval=spec["interval"], size=spec["size"])
    await load.until(lambda: tally.received >= events, spec.get("deadline", 120.0), "every user event")
    cpu = (await load.stats())["cpu"] - cpu0
    result.update(
        {
            "events_per_s": events / (tally.last_recv - sent),
            "cpu_us_per_event": 1e6 * cpu / events,
            **{f"latency_{k}": v for k, v in quantiles(tally.latencies).items()},
        }
    )
    return result


async def run_redis_users(load: Load, spec: dict[str, Any]) -> dict[str, Any]:
    """Per-user notifications: user ``k`` streams ``user:<k>`` from worker ``k % W`` (one
    port per worker, so the split is exact); every event is a fire-and-forget
    ``broadcast("user:<k>")`` from the first worker, one user after another, as fast as
    it publishes (or ``interval`` seconds apart). Delivered events/s from the publish
    request to the last arrival; what has not arrived by the deadline is lost."""
    n, events = spec["clients"], spec["events"]
    tally = load.tally
    deadline = spec.get("deadline", 120.0)
    ports = spec.get("ports") or [load.port]
    loads = [load] + [Load(load.host, port) for port in ports[1:]]
    for other in loads[1:]:
        other.tally = tally
    try:
        started = time.monotonic()
        for w, worker in enumerate(loads):
            await worker.open([f"/sse?channel=user:{k}" for k in range(w, n, len(loads))], deadline=deadline)
        connect_s = time.monotonic() - started
        per_worker = [len(range(w, n, len(loads))) for w in range(len(loads))]
        for worker, count in zip(loads, per_worker, strict=True):
            await worker.wait_clients(count, deadline)
        cpu0 = [(await worker.stats())["cpu"] for worker in loads]
        sent = await load.post(
            "/publish_users", n=events, users=n, interval=spec.get("interval", 0.0), size=spec["size"], send_to=0
        )
        with contextlib.suppress(TimeoutError):  # what did not arrive is counted as lost
            await load.until(lambda: tally.received >= events, deadline, "every user event")
        cpu = [(await worker.stats())["cpu"] - c for worker, c in zip(loads, cpu0, strict=True)]
    finally:
        for other in loads[1:]:
            await other.close()
    delivered = sum(1 for i in range(events) if tally.counts.get(i))
    return {
        "clients": tally.headers,
        "refused": tally.refused + tally.failed,
        "workers": len(loads),
        "connect_per_s": n / connect_s,
        "events_per_s": delivered / (tally.last_recv - sent) if delivered else 0.0,
        "delivered": delivered,
        "lost": events - delivered,
        "duplicates": sum(c - 1 for c in tally.counts.values() if c > 1),
        "cpu_us_per_event": 1e6 * sum(cpu) / events,
        # The publishing worker's part of the CPU (it also delivers to its own half).
        "publisher_cpu_share": cpu[0] / sum(cpu) if sum(cpu) else 0.0,
        **{f"latency_{k}": v for k, v in quantiles(tally.latencies).items()},
    }


async def run_single(load: Load, spec: dict[str, Any]) -> dict[str, Any]:
    events = spec["events"]
    tally = load.tally
    await load.open(["/sse?channel=bench"])
    await load.wait_clients(1)
    sent = await load.post("/publish", n=events, interval=0, size=spec["size"])
    await load.until(lambda: tally.received >= events, spec.get("deadline", 120.0), "every event")
    return {
        "clients": 1,
        "events_per_s": events / (tally.last_recv - sent),
        **{f"latency_{k}": v for k, v in quantiles(tally.latencies).items()},
    }


async def run_stalled(load: Load, spec: dict[str, Any]) -> dict[str, Any]:
    """Readers and clients that stopped reading share a channel. First a burst on a
    channel only the stalled clients joined fills their socket buffers (megabytes on
    loopback), then the readers' latency is measured while the stalled stay stalled."""
    readers, stalled, events = spec["clients"], spec["stalled"], spec["events"]
    tally = load.tally
    deadline = spec.get("deadline", 120.0)
    before = await load.stats(collect=True)
    if stalled:
        await load.open(["/sse?channel=bench&channel=fill"] * stalled, stalled=True)
    await load.open(["/sse?channel=bench"] * readers)
    await load.wait_clients(readers + stalled)
    peak = 0
    fill = spec["fill_events"]
    await load.post("/publish", channel="fill", n=fill, interval=0, size=spec["fill_size"], start=10_000_000)
    end = time.monotonic() + deadline
    while (stats := await load.stats())["published"] < fill:
        peak = max(peak, stats["rss"])
        if time.monotonic() > end:
            raise TimeoutError("the fill burst was not published")
        await asyncio.sleep(0.05)
    sent = await load.post("/publish", n=events, interval=spec["interval"], size=spec["size"])

    def finished() -> bool:
        return all(tally.counts.get(i, 0) >= readers for i in range(events))

    while not finished():
        peak = max(peak, (await load.stats())["rss"])
        if time.monotonic() > end:
            raise TimeoutError("readers did not receive every event")
        await asyncio.sleep(0.05)
    after = await load.stats()
    return {
        "clients": readers,
        "stalled": stalled,
        "events_per_s": readers * events / (tally.last_recv - sent),
        **{f"latency_{k}": v for k, v in quantiles(tally.latencies).items()},
        "rss_growth": max(peak, after["rss"]) - before["rss"],
        "server_clients_end": after["clients"],
    }


async def run_heartbeat(load: Load, spec: dict[str, Any]) -> dict[str, Any]:
    n, window = spec["clients"], spec["window"]
    tally = load.tally
    result = await connect_idle(load, spec, ["/sse?channel=bench"] * n)
    # Let every stream pass its first heartbeat before the window opens.
    connected = result["clients"]
    await load.until(lambda: tally.pings >= connected, spec.get("deadline", 120.0), "a first heartbeat on every stream")
    cpu0, pings0, t0 = (await load.stats())["cpu"], tally.pings, time.monotonic()
    await asyncio.sleep(window)  # a measurement window, not a synchronisation
    cpu1, pings1, t1 = (await load.stats())["cpu"], tally.pings, time.monotonic()
    result.update(
        {
            "cpu_fraction": (cpu1 - cpu0) / (t1 - t0),
            "pings_per_s": (pings1 - pings0) / (t1 - t0),
            "cpu_us_per_ping": 1e6 * (cpu1 - cpu0) / max(1, pings1 - pings0),
        }
    )
    return result


async def run_publish_burst(load: Load, spec: dict[str, Any]) -> dict[str, Any]:
    """One worker on Redis, one stream per ``user:<k>`` channel: a burst of fire-and-forget
    ``broadcast`` calls (the library), then the same work awaited one publish at a time
    (the old outbox); the floor (the library's own script run from a bare redis-py
    pipeline with its arguments built in advance: what Redis does for these events) is
    measured just before and just after the burst, and averaged."""
    n, users, events = spec["clients"], spec["users"], spec["events"]
    tally = load.tally
    deadline = spec.get("deadline", 120.0)
    # Without streams the worker only publishes (and listens to nothing).
    result = await connect_idle(load, spec, [f"/sse?channel=user:{k}" for k in range(n)]) if n else {"clients": 0}

    async def burst(label: str, count: int, start: int, one_at_a_time: bool) -> dict[str, Any]:
        params = {"label": label, "n": count, "users": users, "size": spec["size"], "start": start}
        await load.post("/publish_burst", one_at_a_time=int(one_at_a_time), **params)
        end = time.monotonic() + deadline
        while not (figures := (await load.http.get("/publish_burst", params={"label": label})).json()):
            if time.monotonic() > end:
                raise TimeoutError(f"the {label} burst did not finish in {deadline}s")
            await asyncio.sleep(0.02)
        figures_: dict[str, Any] = figures
        return figures_

    # The floor just before and just after the library (the machine's load drifts).
    floor_before = await floor_rate(spec, events, 20_000_000) if spec.get("floor", True) else float("nan")
    library = await burst("library", events, 0, False)
    if n:
        # Until every stored event of the burst arrived (the floor's are counted apart);
        # what did not arrive by the deadline is reported as lost.
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if sum(1 for i in tally.counts if i < events) >= library["stored"]:
                break
            await asyncio.sleep(0.1)
    counts = [tally.counts.get(i, 0) for i in range(events)]
    delivered = sum(1 for c in counts if c)
    baseline = await burst("baseline", spec["baseline_events"], 10_000_000, True)
    floor_after = await floor_rate(spec, events, 30_000_000) if spec.get("floor", True) else float("nan")
    floor_per_s = (floor_before + floor_after) / 2
    publish_per_s = events / library["seconds"]
    baseline_per_s = spec["baseline_events"] / baseline["seconds"]
    result.update(
        {
            "publish_per_s": publish_per_s,
            "stored": library["stored"],
            "delivered": delivered,
            "duplicates": sum(c - 1 for c in counts if c > 1),
            "lost": events - delivered if n else events - library["stored"],
            "publish_failures": library["publish_failures"],
            "baseline_per_s": baseline_per_s,
            "floor_per_s": floor_per_s,
            "vs_floor": publish_per_s / floor_per_s,
            "vs_baseline": publish_per_s / baseline_per_s,
        }
    )
    return result


async def floor_rate(spec: dict[str, Any], events: int, start: int) -> float:
    """Events/s of the floor (``bench/redis_floor.py``), run in its own process while
    this one keeps reading the streams."""
    floor = {**spec, "events": events, "start": start}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.redis_floor", json.dumps(floor), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), spec.get("deadline", 120.0))
    if proc.returncode:
        raise RuntimeError(f"the floor failed with {proc.returncode}")
    rate: float = json.loads(out)
    return rate


SCENARIOS = {
    "fanout": run_fanout,
    "paced": run_paced,
    "users": run_users,
    "redis_users": run_redis_users,
    "single": run_single,
    "stalled": run_stalled,
    "heartbeat": run_heartbeat,
    "publish_burst": run_publish_burst,
    "idle": lambda load, spec: connect_idle(load, spec, ["/sse?channel=bench"] * spec["clients"]),
}


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["host"], spec["port"]
    if not host.startswith("127."):
        raise SystemExit("the load client only targets loopback addresses")
    raise_fd_limit(spec.get("clients", 1) + spec.get("stalled", 0) + 1024)
    load = Load(host, port)
    try:
        return await SCENARIOS[spec["scenario"]](load, spec)
    finally:
        await load.close()


if __name__ == "__main__":
    import uvloop

    print(json.dumps(uvloop.run(main(json.loads(sys.argv[1])))))
