"""The reconnect storm: N streams over two workers on one Redis; one worker is
stopped (SIGTERM: it drains its streams in waves over ``drain_window``), and its
clients reconnect, as EventSource does after each stream's ``retry:`` delay, to the
other worker with their ``Last-Event-ID``. Beside it, in turns, the baseline: the same
restart with ``drain_window=0`` and ``retry_jitter=0``. Measured: the time from the signal until
every moved stream has resumed (its opening arrived), the peak reconnect rate (per
100 ms), the Redis commands per resume (``INFO commandstats``), and that every
client still gets the next event once. All on 127.0.0.1.

Usage: ``python -m bench.storm [--streams 10000] [--drain-window 5] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import redis

from bench.loadgen import raise_fd_limit
from tests.helpers.redis import start_redis
from tests.helpers.servers import free_port, wait_for_port


class Client(asyncio.Protocol):
    """One EventSource-like stream: keeps its last id and ``retry:``; when its stream
    ends, reconnects to ``fallback`` after the retry delay with ``Last-Event-ID``."""

    def __init__(self, storm: Storm, port: int) -> None:
        self.storm = storm
        self.port = port
        self.last_id = ""
        self.retry = 3.0
        self.buffer = b""
        self.resumed = False
        self.moved = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        headers = f"Last-Event-ID: {self.last_id}\r\n" if self.last_id else ""
        request = f"GET /sse?channel=storm HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n{headers}\r\n"
        transport.write(request.encode())

    def data_received(self, data: bytes) -> None:
        if self.moved and not self.resumed:
            self.resumed = True
            self.storm.resumed(self)
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"id: "):
                self.last_id = line[4:].decode().strip()
            elif line.startswith(b"retry: "):
                self.retry = int(line[7:]) / 1000
            elif line.startswith(b"data: ") and b'"i":1,' in line:  # the event after the storm
                self.storm.delivered[id(self)] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.storm.stopping:
            return
        self.storm.ended(self)
        loop = asyncio.get_running_loop()
        loop.call_later(self.retry, lambda: loop.create_task(self.reconnect()))

    async def reconnect(self) -> None:
        self.port, self.moved, self.resumed, self.buffer = self.storm.survivor, True, False, b""
        self.storm.reconnects.append(time.monotonic())
        await asyncio.get_running_loop().create_connection(lambda: self, "127.0.0.1", self.port)


class Storm:
    def __init__(self, survivor: int) -> None:
        self.survivor = survivor
        self.stopping = False
        self.reconnects: list[float] = []
        self.resumes: list[float] = []
        self.moving = 0
        self.all_resumed = asyncio.Event()
        self.delivered: Counter[int] = Counter()

    def ended(self, client: Client) -> None:
        self.moving += 1

    def resumed(self, client: Client) -> None:
        self.resumes.append(time.monotonic())
        if len(self.resumes) == self.moving:
            self.all_resumed.set()


def _worker(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "uvicorn", "bench.apps.ours:app", "--port", str(port), "--log-level", "warning"]
    command += ["--loop", "uvloop", "--http", "httptools", "--no-access-log"]
    proc = subprocess.Popen(command, env={**os.environ, **env})
    wait_for_port(port, deadline=30, proc=proc)
    return proc


def _commands(r: redis.Redis) -> int:
    stats: dict[str, Any] = r.info("commandstats")  # type: ignore[assignment]
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_"))


async def storm(
    streams: int, drain_window: float, retry: float, redis_url: str, jitter: float | None = None
) -> dict[str, float]:
    env = {
        "SSE_BACKEND": "redis",
        "SSE_REDIS_URL": redis_url,
        "SSE_REDIS_KEY_PREFIX": f"storm:{uuid.uuid4().hex[:8]}:",
        "SSE_MAX_CONNECTIONS": str(streams + 100),
        "SSE_DRAIN_WINDOW": str(drain_window),
        "SSE_RETRY_INTERVAL": str(retry),
        "SSE_HEARTBEAT_INTERVAL": "60",
    }
    if jitter is not None:
        env["SSE_RETRY_JITTER"] = str(jitter)
    ports = [free_port(), free_port()]
    procs = [_worker(port, env) for port in ports]
    storm_ = Storm(ports[0])
    loop = asyncio.get_running_loop()
    clients = []
    try:
        for n in range(streams):
            client = Client(storm_, ports[n % 2])
            await loop.create_connection(lambda client=client: client, "127.0.0.1", client.port)
            clients.append(client)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[0]}", timeout=60) as http:
            published = await http.post("/publish", params={"channel": "storm", "n": 1, "start": 0})
            published.raise_for_status()
            deadline = time.monotonic() + 60
            while any(not c.last_id for c in clients):  # every stream has an id to resume from
                if time.monotonic() > deadline:
                    raise TimeoutError("streams did not get the first event")
                await asyncio.sleep(0.05)
            r = redis.Redis.from_url(redis_url)
            before = _commands(r)
            started = time.monotonic()
            procs[1].send_signal(signal.SIGTERM)
            await asyncio.wait_for(storm_.all_resumed.wait(), drain_window + 4 * retry + 60)
            took = time.monotonic() - started
            commands = _commands(r) - before
            (await http.post("/publish", params={"channel": "storm", "n": 1, "start": 1})).raise_for_status()
            deadline = time.monotonic() + 60
            while len(storm_.delivered) < streams:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{streams - len(storm_.delivered)} streams missed the event after the storm")
                await asyncio.sleep(0.05)
        buckets = Counter(int((t - started) * 10) for t in storm_.reconnects)
        twice = sum(1 for n in storm_.delivered.values() if n != 1)
        return {
            "moved": storm_.moving,
            "all_resumed_s": took,
            "peak_reconnects_per_s": max(buckets.values()) * 10,
            "redis_commands_per_resume": commands / max(1, storm_.moving),
            "not_exactly_once": twice,
        }
    finally:
        storm_.stopping = True
        for client in clients:
            if client.transport is not None:
                client.transport.close()
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--drain-window", type=float, default=5.0)
    parser.add_argument("--retry", type=float, default=3.0, help="retry_interval of the workers (seconds)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    raise_fd_limit(args.streams * 3 + 200)
    server = start_redis()
    # The baseline: the same restart without waves or jitter, every stream ended at the
    # signal with the same retry delay. The two take turns in each repeat.
    setups = {"spread": (args.drain_window, None), "baseline": (0.0, 0.0)}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    try:
        for repeat in range(args.repeats):
            for name, (window, jitter) in setups.items() if repeat % 2 == 0 else reversed(setups.items()):
                result = asyncio.run(storm(args.streams, window, args.retry, server.url, jitter))
                results[name].append(result)
                print(f"run {repeat + 1} {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items()), flush=True)
    finally:
        server.proc.kill()
        server.proc.wait(10)
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    print(f"streams={args.streams} drain_window={args.drain_window}s retry={args.retry}s (medians)")
    print(f"  {'':28} {'spread':>12} {'baseline':>12}")
    for key in medians["spread"]:
        print(f"  {key:28} {medians['spread'][key]:>12,.2f} {medians['baseline'][key]:>12,.2f}")
    print(json.dumps({"medians": medians["spread"], "baseline": medians["baseline"], "runs": results}))


if __name__ == "__main__":
    main()
