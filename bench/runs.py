"""The runs benchmark: tokens per second delivered to N viewers of one run, beside the
same tokens through a plain channel (the floor: no storage per run, no lease), the
latency of a resume from the middle of a run, and of a cancel from the request to the
terminal event at a viewer. Server and viewers in separate processes on 127.0.0.1.

Usage: ``python -m bench.runs [--viewers 1000] [--tokens 2000] [--repeats 3]``;
prints medians (and each run) of every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx

from bench.loadgen import raise_fd_limit
from tests.helpers.servers import free_port, wait_for_port


class Viewer(asyncio.Protocol):
    """One raw SSE connection: counts ``token`` events until ``end``."""

    def __init__(self, done: asyncio.Future[float]) -> None:
        self.done = done
        self.tokens = 0
        self.tail = b""
        self.opened = asyncio.Event()  # its first bytes arrived
        self.flowing = asyncio.Event()  # five tokens arrived

    def data_received(self, data: bytes) -> None:
        self.opened.set()
        if self.tokens >= 5:
            self.flowing.set()
        chunk = self.tail + data
        self.tokens += chunk.count(b"event: token\n")
        if b"event: end\n" in chunk and not self.done.done():
            self.done.set_result(time.perf_counter())
        self.tail = chunk[-16:]
        self.tokens -= self.tail.count(b"event: token\n")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(time.perf_counter())


async def _connect(port: int, path: str, headers: str = "") -> tuple[Viewer, asyncio.Future[float], Any]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()
    transport, viewer = await loop.create_connection(lambda: Viewer(done), "127.0.0.1", port)
    transport.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n{headers}\r\n".encode())
    return viewer, done, transport


async def _opened(viewers: list[tuple[Viewer, asyncio.Future[float], Any]]) -> None:
    """Until every viewer's stream is open (its first bytes arrived)."""
    await asyncio.wait_for(asyncio.gather(*(v.opened.wait() for v, _, _ in viewers)), 60)


async def fan_out(port: int, viewers: int, tokens: int, kind: str) -> float:
    """Tokens per second delivered to every viewer, from the go to the last ``end``."""
    run_id = uuid.uuid4().hex
    path = f"/runs/{run_id}" if kind == "run" else "/subscribe?channel=c"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
        if kind == "run":
            (await http.post("/run", params={"run_id": run_id, "tokens": tokens})).raise_for_status()
        opened = [await _connect(port, path) for _ in range(viewers)]
        await _opened(opened)
        started = time.perf_counter()
        if kind == "run":
            (await http.post("/run/go", params={"run_id": run_id})).raise_for_status()
        else:
            (await http.post("/channel", params={"tokens": tokens})).raise_for_status()
        ends = await asyncio.wait_for(asyncio.gather(*(d for _, d, _ in opened)), 300)
    for _, _, transport in opened:
        transport.close()
    got = sum(v.tokens for v, _, _ in opened)
    if got != viewers * tokens:
        raise AssertionError(f"{kind}: {got} tokens delivered, {viewers * tokens} expected")
    return got / (max(ends) - started)


async def resume_latency(port: int, tokens: int) -> float:
    """Seconds from a viewer's reconnect, with the id of the run's middle token, to the
    end of the run's rest (``tokens / 2`` events and ``end``)."""
    run_id = uuid.uuid4().hex
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
        (await http.post("/run", params={"run_id": run_id, "tokens": tokens})).raise_for_status()
        first, done, transport = await _connect(port, f"/runs/{run_id}")
        await _opened([(first, done, transport)])
        (await http.post("/run/go", params={"run_id": run_id})).raise_for_status()
        await asyncio.wait_for(done, 60)
        transport.close()
        # The run's events have ids that are sequence numbers: the middle one is read
        # from a replay.
        async with http.stream("GET", f"/runs/{run_id}") as whole:
            body = (await whole.aread()).decode()
        ids = [line[4:] for line in body.splitlines() if line.startswith("id: ")]
        middle = ids[1 + tokens // 2]
        started = time.perf_counter()
        _, done, transport = await _connect(port, f"/runs/{run_id}", f"Last-Event-ID: {middle}\r\n")
        finished = await asyncio.wait_for(done, 60)
        transport.close()
    return finished - started


async def cancel_latency(port: int) -> float:
    """Seconds from a cancel request to the ``end`` event at a viewer of a run whose
    producer sends a token every 10 ms (producer and viewer on one worker)."""
    run_id = uuid.uuid4().hex
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        (await http.post("/run", params={"run_id": run_id, "tokens": 0, "pace": 0.01})).raise_for_status()
        viewer, done, transport = await _connect(port, f"/runs/{run_id}")
        await _opened([(viewer, done, transport)])
        (await http.post("/run/go", params={"run_id": run_id})).raise_for_status()
        await asyncio.wait_for(viewer.flowing.wait(), 30)
        started = time.perf_counter()
        (await http.post(f"/runs/{run_id}/cancel")).raise_for_status()
        finished = await asyncio.wait_for(done, 30)
        transport.close()
    return finished - started


def _serve(port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "uvicorn", "bench.apps.runs:app", "--port", str(port), "--log-level", "warning"]
    command += ["--loop", "uvloop", "--http", "httptools", "--no-access-log"]
    env = {**os.environ, "SSE_MAX_CONNECTIONS": "20000", "SSE_RUN_HISTORY_SIZE": "100000"}
    proc = subprocess.Popen(command, env=env)
    wait_for_port(port, deadline=30, proc=proc)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--viewers", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    raise_fd_limit(args.viewers * 2 + 100)
    figures: dict[str, list[float]] = {"run": [], "channel": [], "resume_s": [], "cancel_s": []}
    for repeat in range(args.repeats):
        port = free_port()
        proc = _serve(port)
        try:
            # Alternated in one server, so the machine's noise falls on both alike.
            figures["channel"].append(asyncio.run(fan_out(port, args.viewers, args.tokens, "channel")))
            figures["run"].append(asyncio.run(fan_out(port, args.viewers, args.tokens, "run")))
            figures["resume_s"].append(asyncio.run(resume_latency(port, args.tokens)))
            figures["cancel_s"].append(asyncio.run(cancel_latency(port)))
        finally:
            proc.terminate()
            proc.wait(20)
        print(f"run {repeat + 1}: " + ", ".join(f"{k}={v[-1]:.4g}" for k, v in figures.items()), flush=True)
    medians = {k: statistics.median(v) for k, v in figures.items()}
    print(f"viewers={args.viewers} tokens={args.tokens} repeats={args.repeats} (medians)")
    print(f"  tokens/s delivered, through a run:     {medians['run']:>12,.0f}")
    print(f"  tokens/s delivered, through a channel: {medians['channel']:>12,.0f}")
    print(f"  run / channel:                         {medians['run'] / medians['channel']:>12.2f}")
    print(f"  resume from the middle, to the end:    {medians['resume_s'] * 1000:>10.1f} ms")
    print(f"  cancel to the end event:               {medians['cancel_s'] * 1000:>10.1f} ms")
    print(json.dumps({"medians": medians, "runs": figures}))


if __name__ == "__main__":
    main()
