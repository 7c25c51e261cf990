"""The straightforward app: FastAPI + sse-starlette, one ``asyncio.Queue`` and one
generator per client, the event's JSON encoded once per broadcast."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Query
from sse_starlette import EventSourceResponse

from bench.apps.common import add_bench_routes

HEARTBEAT = float(os.environ.get("BENCH_HEARTBEAT", "15"))

app = FastAPI()
channels: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
users: dict[str, asyncio.Queue[dict[str, Any]]] = {}
ids = itertools.count(1)
connected = 0


def broadcast(channel: str, data: str) -> None:
    event = {"event": "bench", "data": data, "id": str(next(ids))}
    for queue in channels.get(channel, ()):
        queue.put_nowait(event)


def send_to_user(user: str, data: str) -> bool:
    queue = users.get(user)
    if queue is None:
        return False
    queue.put_nowait({"event": "bench", "data": data, "id": str(next(ids))})
    return True


@app.get("/sse")
async def sse(channel: list[str] = Query(["bench"]), user: str | None = None) -> EventSourceResponse:
    global connected
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for name in channel:
        channels.setdefault(name, set()).add(queue)
    if user is not None:
        users[user] = queue
    connected += 1

    async def stream() -> AsyncIterator[dict[str, Any]]:
        global connected
        try:
            while True:
                yield await queue.get()
        finally:
            connected -= 1
            for name in channel:
                channels[name].discard(queue)
            if user is not None and users.get(user) is queue:
                del users[user]

    return EventSourceResponse(stream(), ping=HEARTBEAT)


add_bench_routes(app, broadcast=broadcast, send_to_user=send_to_user, clients=lambda: connected)
