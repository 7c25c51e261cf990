"""What every benchmarked app shares: the payload, the publisher task and the stats route.

Every app exposes the same routes so one load client drives them all:

- ``GET /sse?channel=c[&channel=d]`` opens a stream (``user=<k>`` names the client for ``send_to``);
- ``POST /publish?channel=c&n=N&interval=s&size=b&start=i`` publishes N events, ``interval`` seconds apart
  (0: back to back), each carrying its publish time ``t`` (``time.monotonic()``, shared by every process
  of the machine) and its index ``i``;
- ``POST /publish_users?n=N&users=U&interval=s`` mixes ``broadcast("user:{k}")`` and ``send_to(<client of k>)``
  (``send_to=0``: every event a ``broadcast("user:{k}")``, which reaches a user on any worker);
- ``GET /stats?collect=1`` reports clients, RSS, live GC objects, GC pauses and CPU time;
- ``POST /reset`` forgets the GC pauses seen so far.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

_PAGE = os.sysconf("SC_PAGE_SIZE")


def payload(index: int, pad: str) -> dict[str, Any]:
    return {"t": time.monotonic(), "i": index, "p": pad}


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


class GCWatch:
    """Time every collection through ``gc.callbacks``; keep the pauses of the oldest generation."""

    def __init__(self) -> None:
        self.started = 0.0
        self.full: list[float] = []
        self.young_max = 0.0
        self.young_count = 0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        pause = time.perf_counter() - self.started
        if info["generation"] == 2:
            self.full.append(pause)
        else:
            self.young_count += 1
            self.young_max = max(self.young_max, pause)

    def reset(self) -> None:
        self.full.clear()
        self.young_max = 0.0
        self.young_count = 0


_publishers: set[asyncio.Task[None]] = set()


def spawn(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _publishers.add(task)
    task.add_done_callback(_publishers.discard)


async def pace(interval: float, index: int) -> None:
    """Between two publishes: sleep ``interval``, or yield now and then when it is 0 so
    the publisher does not starve the writers for ever."""
    if interval > 0:
        await asyncio.sleep(interval)
    elif index % 64 == 63:
        await asyncio.sleep(0)


def add_bench_routes(
    app: FastAPI,
    *,
    broadcast: Callable[[str, str], None],
    send_to_user: Callable[[str, str], bool],
    clients: Callable[[], int],
) -> None:
    """Add the publish and stats routes; ``broadcast(channel, data_json)`` and
    ``send_to_user(user, data_json)`` are the app's own way of sending an event."""
    watch = GCWatch()
    published = [0]

    async def publish_task(channel: str, n: int, interval: float, size: int, start: int) -> None:
        pad = "x" * size
        for k in range(n):
            broadcast(channel, dumps(payload(start + k, pad)))
            published[0] += 1
            await pace(interval, k)

    async def publish_users_task(n: int, users: int, interval: float, size: int, start: int, direct: bool) -> None:
        pad = "x" * size
        for k in range(n):
            user = str(k % users)
            data = dumps(payload(start + k, pad))
            if direct and k % 2:
                send_to_user(user, data)
            else:
                broadcast(f"user:{user}", data)
            await pace(interval, k)

    @app.post("/publish")
    async def publish(
        channel: str = "bench", n: int = 1, interval: float = 0.0, size: int = 64, start: int = 0
    ) -> dict[str, Any]:
        spawn(publish_task(channel, n, interval, size, start))
        return {"ok": True}

    @app.post("/publish_users")
    async def publish_users(
        n: int = 1, users: int = 1, interval: float = 0.0, size: int = 64, start: int = 0, send_to: bool = True
    ) -> dict[str, Any]:
        spawn(publish_users_task(n, users, interval, size, start, send_to))
        return {"ok": True}

    @app.post("/reset")
    async def reset() -> dict[str, Any]:
        watch.reset()
        return {"ok": True}

    @app.get("/census")
    async def census() -> dict[str, int]:
        """Live objects by type, to see what a connection is made of."""
        gc.collect()
        counts: dict[str, int] = {}
        for obj in gc.get_objects():
            name = type(obj).__qualname__
            counts[name] = counts.get(name, 0) + 1
        return counts

    @app.get("/stats")
    async def stats(collect: bool = False) -> dict[str, Any]:
        if collect:
            seen = len(watch.full)
            gc.collect()
            del watch.full[seen:]  # this deliberate collection is not a pause of the app's
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "clients": clients(),
            "rss": rss_bytes(),
            "gc_objects": len(gc.get_objects()),
            "gc_full_pauses": list(watch.full),
            "gc_young_max": watch.young_max,
            "gc_young_count": watch.young_count,
            "cpu": usage.ru_utime + usage.ru_stime,
            "published": published[0],
            "pid": os.getpid(),
        }
