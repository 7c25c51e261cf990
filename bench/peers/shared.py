"""What the apps without FastAPI share: the publish loops and the stats of ``/stats``.

The routes and their parameters are those of :mod:`bench.apps.common`; each app maps
its framework's request onto :class:`Bench` (a dict of query parameters in, a dict out).
"""

from __future__ import annotations

import gc
import os
import resource
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from bench.apps.common import GCWatch, dumps, pace, payload, rss_bytes, spawn


class Bench:
    """The publish, stats and reset routes of one app, given its own way of sending
    (plain functions, or coroutine functions that the publishing task awaits)."""

    def __init__(
        self,
        *,
        broadcast: Callable[[str, str], Awaitable[None] | None],
        send_to_user: Callable[[str, str], Awaitable[bool] | bool],
        clients: Callable[[], int],
    ) -> None:
        self.broadcast = broadcast
        self.send_to_user = send_to_user
        self.clients = clients
        self.watch = GCWatch()
        self.published = 0

    async def _publish(self, channel: str, n: int, interval: float, size: int, start: int) -> None:
        pad = "x" * size
        for k in range(n):
            sent = self.broadcast(channel, dumps(payload(start + k, pad)))
            if isinstance(sent, Awaitable):
                await sent
            self.published += 1
            await pace(interval, k)

    async def _publish_users(self, n: int, users: int, interval: float, size: int, start: int) -> None:
        pad = "x" * size
        for k in range(n):
            user = str(k % users)
            data = dumps(payload(start + k, pad))
            sent = self.send_to_user(user, data) if k % 2 else self.broadcast(f"user:{user}", data)
            if isinstance(sent, Awaitable):
                await sent
            await pace(interval, k)

    def publish(self, query: Mapping[str, str]) -> dict[str, Any]:
        spawn(
            self._publish(
                query.get("channel", "bench"),
                int(query.get("n", 1)),
                float(query.get("interval", 0.0)),
                int(query.get("size", 64)),
                int(query.get("start", 0)),
            )
        )
        return {"ok": True}

    def publish_users(self, query: Mapping[str, str]) -> dict[str, Any]:
        spawn(
            self._publish_users(
                int(query.get("n", 1)),
                int(query.get("users", 1)),
                float(query.get("interval", 0.0)),
                int(query.get("size", 64)),
                int(query.get("start", 0)),
            )
        )
        return {"ok": True}

    def reset(self, query: Mapping[str, str]) -> dict[str, Any]:
        self.watch.reset()
        return {"ok": True}

    def stats(self, query: Mapping[str, str]) -> dict[str, Any]:
        if query.get("collect") in ("1", "true"):
            seen = len(self.watch.full)
            gc.collect()
            del self.watch.full[seen:]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "clients": self.clients(),
            "rss": rss_bytes(),
            "gc_objects": len(gc.get_objects()),
            "gc_full_pauses": list(self.watch.full),
            "cpu": usage.ru_utime + usage.ru_stime,
            "published": self.published,
            "pid": os.getpid(),
        }

    def route(self, method: str, path: str) -> Callable[[Mapping[str, str]], dict[str, Any]] | None:
        """The handler of a non-stream route, or None."""
        routes: dict[tuple[str, str], Callable[[Mapping[str, str]], dict[str, Any]]] = {
            ("POST", "/publish"): self.publish,
            ("POST", "/publish_users"): self.publish_users,
            ("POST", "/reset"): self.reset,
            ("GET", "/stats"): self.stats,
        }
        return routes.get((method, path))
