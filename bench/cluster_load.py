"""The load client of the Redis Cluster benchmark (``bench/cluster.py``), in its own
process: one scenario against two workers (``bench/apps/cluster.py``), on one Redis or
on a cluster alike. Streams are raw asyncio sockets (``bench/loadgen.py``); the Redis
commands an operation costs are ``INFO commandstats`` of every master (one Redis: the
server) read just before and just after it, the ``INFO`` calls themselves left out.
Every wait has a deadline.

Usage: ``python -m bench.cluster_load '<json spec>'``; prints one JSON object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import time
from array import array
from typing import Any

import redis

from bench.loadgen import Load, Tally, quantiles, raise_fd_limit

WARM_UP = 1_000_000
"""Indices of warm-up events start here, away from the measured ones."""


SCRIPTS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")
SCRIPT_US = "script microseconds"
"""Not a command: the time Redis spent running scripts (their ``usec``, which includes
the commands they call), read with the calls."""


class Commands:
    """Calls per command summed over some Redis servers (``INFO commandstats``), and
    the microseconds spent in scripts."""

    def __init__(self, ports: list[int]) -> None:
        self.clients = [redis.Redis(host="127.0.0.1", port=p, decode_responses=True) for p in ports]

    def read(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for client in self.clients:
            stats: dict[str, Any] = client.info("commandstats")
            for name, values in stats.items():
                command = name.removeprefix("cmdstat_")
                totals[command] = totals.get(command, 0) + int(values["calls"])
                if command in SCRIPTS:
                    totals[SCRIPT_US] = totals.get(SCRIPT_US, 0) + int(values["usec"])
        return totals

    @staticmethod
    def spent(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        """Calls made between two readings, without the readings' own ``INFO`` and the
        replicas' ``REPLCONF ACK`` (replication, not the workers')."""
        spent = {k: v - before.get(k, 0) for k, v in after.items() if k not in ("info", "replconf", SCRIPT_US)}
        return {k: v for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v}

    @staticmethod
    def script_us(before: dict[str, int], after: dict[str, int]) -> int:
        return after.get(SCRIPT_US, 0) - before.get(SCRIPT_US, 0)

    def close(self) -> None:
        for client in self.clients:
            client.close()


def loads_of(spec: dict[str, Any], tally: Tally) -> list[Load]:
    loads = [Load("127.0.0.1", port) for port in spec["ports"]]
    for load in loads:
        load.tally = tally
    return loads


async def open_split(loads: list[Load], paths: list[list[str]], deadline: float) -> None:
    """Open ``paths[w]`` on worker ``w`` and wait until each worker reports them."""
    for load, mine in zip(loads, paths, strict=True):
        await load.open(mine, deadline=deadline)
    tally = loads[0].tally
    if tally.refused or tally.failed:
        raise RuntimeError(f"{tally.refused} streams refused, {tally.failed} not accepted")
    for load, mine in zip(loads, paths, strict=True):
        await load.wait_clients(len(mine), deadline)


async def down_to(load: Load, count: int, deadline: float) -> None:
    """Until the worker reports at most ``count`` streams."""
    end = time.monotonic() + deadline
    while (await load.stats())["clients"] > count:
        if time.monotonic() > end:
            raise TimeoutError(f"the worker did not get down to {count} streams in {deadline}s")
        await asyncio.sleep(0.01)


async def warmed(attempt: Any, step: int, deadline: float) -> None:
    """Call ``attempt(start, wait)`` (publish warm-up events from index ``start``, wait
    up to ``wait`` seconds for all of them to reach every stream) until one succeeds:
    a worker counts a stream, and its status line goes out, before the stream's
    subscription is live; the stream's first id marks where its events start."""
    end = time.monotonic() + deadline
    for start in range(WARM_UP, WARM_UP + 1000 * step, step):
        try:
            await attempt(start, 1.0)
            return
        except TimeoutError:
            if time.monotonic() > end:
                raise


async def fanout(loads: list[Load], spec: dict[str, Any]) -> dict[str, Any]:
    """``subscribers`` streams of one channel split over the workers, ``broadcasts``
    fire-and-forget broadcasts from the first worker, each once the one before reached
    every stream."""
    n, events, deadline = spec["subscribers"], spec["broadcasts"], spec["deadline"]
    tally, first = loads[0].tally, loads[0]
    await open_split(loads, [["/sse?channel=fan"] * len(range(w, n, len(loads))) for w in range(len(loads))], deadline)

    async def broadcast(index: int, wait: float) -> None:
        await first.post("/publish", channel="fan", n=1, start=index, size=spec["size"])
        await first.until(lambda: tally.counts.get(index, 0) >= n, wait, f"broadcast {index} to reach all")

    await warmed(broadcast, 1, deadline)
    tally.latencies = array("d")
    started = time.monotonic()
    reach = []
    for index in range(events):
        await broadcast(index, deadline)
        reach.append(tally.worst[index])
    latency = quantiles(tally.latencies)
    return {
        "fanout_events_per_s": n * events / (tally.last_recv - started),
        "fanout_one_broadcast_s": statistics.median(reach),
        "fanout_p50_s": latency["p50"],
        "fanout_p99_s": latency["p99"],
    }


async def channels(loads: list[Load], spec: dict[str, Any]) -> dict[str, Any]:
    """``channels`` channels (``user:<k>``), ``per_channel`` streams each spread over the
    workers, and a burst of ``burst`` events per channel, round robin: fire-and-forget
    ``broadcast`` calls from the first worker in one loop. Delivered events/s from the
    publish request to the last arrival; what has not arrived by the deadline is lost."""
    count, each, deadline = spec["channels"], spec["per_channel"], spec["deadline"]
    tally, first = loads[0].tally, loads[0]
    paths: list[list[str]] = [[] for _ in loads]
    for k in range(count):
        for j in range(each):
            paths[(k + j) % len(loads)].append(f"/sse?channel=user:{k}")
    await open_split(loads, paths, deadline)

    async def warm_up(start: int, wait: float) -> None:
        await first.post("/publish_users", n=count, users=count, start=start, size=spec["size"], send_to=0)
        reached = range(start, start + count)
        await first.until(lambda: all(tally.counts.get(i, 0) >= each for i in reached), wait, "a warm-up round")

    await warmed(warm_up, count, deadline)
    tally.latencies = array("d")
    received, events = tally.received, count * spec["burst"]
    commands = Commands(spec["redis_ports"])
    before = commands.read()
    sent = await first.post("/publish_users", n=events, users=count, start=0, size=spec["size"], send_to=0)
    expected = events * each

    def delivered_now() -> int:
        return sum(tally.counts.get(i, 0) for i in range(events))

    with contextlib.suppress(TimeoutError):
        # Cheap test first, then the exact count (a late warm-up event counts in the first).
        await first.until(lambda: tally.received - received >= expected, deadline, "every event of the burst")
        await first.until(lambda: delivered_now() >= expected, deadline, "every event of the burst")
    delivered = delivered_now()
    after = commands.read()
    commands.close()
    latency = quantiles(tally.latencies)
    return {
        "channels_events_per_s": delivered / (tally.last_recv - sent) if delivered else 0.0,
        "channels_script_calls_per_event": after.get("evalsha", 0) / events - before.get("evalsha", 0) / events,
        "channels_script_us_per_event": Commands.script_us(before, after) / events,
        "channels_p99_s": latency["p99"],
        "channels_lost": expected - delivered,
    }


async def publish(loads: list[Load], spec: dict[str, Any]) -> dict[str, Any]:
    """One publisher, ``publishes`` awaited publishes one after another (``POST
    /publish_wait``: answered once the backend has stored and announced the event)."""
    http = loads[0].http
    commands = Commands(spec["redis_ports"])
    try:

        async def one(index: int) -> tuple[float, float]:
            began = time.perf_counter()
            response = await http.post("/publish_wait", params={"channel": "pub", "start": index})
            response.raise_for_status()
            return time.perf_counter() - began, float(response.json()["seconds"])

        for index in range(WARM_UP, WARM_UP + 20):
            await one(index)
        before = commands.read()
        took = [await one(index) for index in range(spec["publishes"])]
        after = commands.read()
        spent, script_us = Commands.spent(before, after), Commands.script_us(before, after)
    finally:
        commands.close()
    count = spec["publishes"]
    return {
        "publish_p50_s": statistics.median(t for t, _ in took),
        "publish_await_p50_s": statistics.median(a for _, a in took),
        "commands_per_publish": sum(spent.values()) / count,
        "script_us_per_publish": script_us / count,
        "publish_commands": {k: v / count for k, v in spent.items()},
    }


class Resumer(asyncio.Protocol):
    """One stream: keeps its last id, counts ``bench`` events (and ``gap``s); done when
    ``expected`` events arrived."""

    def __init__(self, request: bytes, expected: int) -> None:
        self.request = request
        self.expected = expected
        self.last_id = ""
        self.events = 0
        self.gaps = 0
        self.kind = b""
        self.buffer = b""
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        # Line by line: a chunk of the chunked encoding holds whole events, so its size
        # lines fall between events.
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r")
            if line.startswith(b"id: "):
                self.last_id = line[4:].decode()
                if not self.opened.done():
                    self.opened.set_result(None)
            elif line.startswith(b"event: "):
                self.kind = line[7:]
            elif not line and self.kind:
                if self.kind == b"bench":
                    self.events += 1
                elif self.kind == b"gap":
                    self.gaps += 1
                self.kind = b""
                if self.events >= self.expected and not self.done.done():
                    self.done.set_result(time.perf_counter())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():  # ended early: the count of events tells
            self.done.set_result(time.perf_counter())


async def open_resumer(port: int, path: str, last_id: str, expected: int) -> Resumer:
    header = f"Last-Event-ID: {last_id}\r\n" if last_id else ""
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n{header}\r\n".encode()
    loop = asyncio.get_running_loop()
    _, stream = await loop.create_connection(lambda: Resumer(request, expected), "127.0.0.1", port)
    return stream


async def resume(loads: list[Load], spec: dict[str, Any]) -> dict[str, Any]:
    """A stream on three channels (on a cluster, on three masters) misses ``missed``
    events per channel, then reconnects to the first worker with its ``Last-Event-ID``:
    the seconds from the request to its last replayed event, and the Redis commands of
    the resume. A stream of another client holds the channels on that worker, so the
    resume reads history and subscribes nothing new; one resume warms up first."""
    names, missed, deadline = spec["resume_channels"], spec["missed"], spec["deadline"]
    first, other, tally = loads[0], loads[-1], loads[0].tally
    path = "/sse?" + "&".join(f"channel={c}" for c in names)
    await open_split(loads[:1], [[path]], deadline)
    stream = await open_resumer(first.port, path, "", 1)
    await asyncio.wait_for(stream.opened, deadline)
    cursor = stream.last_id
    assert stream.transport is not None
    stream.transport.close()
    commands = Commands(spec["redis_ports"])
    times: list[float] = []
    spent: dict[str, int] = {}
    script_us = 0
    expected = missed * len(names)
    try:
        for attempt in range(1 + spec["resumes"]):
            await down_to(first, 1, deadline)  # the stream before has ended
            response = await other.http.post(
                "/publish_batch", params={"channel": names, "n": missed, "start": attempt * expected}
            )
            response.raise_for_status()
            held = (attempt + 1) * expected
            await first.until(lambda held=held: tally.received >= held, deadline, "the holder to get the events")
            before = commands.read()
            began = time.perf_counter()
            stream = await open_resumer(first.port, path, cursor, expected)
            finished = await asyncio.wait_for(stream.done, deadline)
            after = commands.read()
            cursor = stream.last_id
            assert stream.transport is not None
            stream.transport.close()
            if stream.events != expected or stream.gaps:
                raise RuntimeError(f"the resume replayed {stream.events} of {expected} events, {stream.gaps} gaps")
            if attempt:
                times.append(finished - began)
                script_us += Commands.script_us(before, after)
                for k, v in Commands.spent(before, after).items():
                    spent[k] = spent.get(k, 0) + v
    finally:
        commands.close()
    count = spec["resumes"]
    return {
        "resume_s": statistics.median(times),
        "commands_per_resume": sum(spent.values()) / count,
        "script_us_per_resume": script_us / count,
        "resume_commands": {k: v / count for k, v in sorted(spent.items(), key=lambda kv: -kv[1])},
    }


SCENARIOS = {"fanout": fanout, "channels": channels, "publish": publish, "resume": resume}


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    raise_fd_limit(spec.get("subscribers", 0) + spec.get("channels", 0) * spec.get("per_channel", 0) + 1024)
    loads = loads_of(spec, Tally())
    try:
        return await SCENARIOS[spec["scenario"]](loads, spec)
    finally:
        for load in loads:
            await load.close()


if __name__ == "__main__":
    import uvloop

    print(json.dumps(uvloop.run(main(json.loads(sys.argv[1])))))
