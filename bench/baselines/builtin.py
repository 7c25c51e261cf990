"""FastAPI's own SSE support (``fastapi.sse``): a generator endpoint with
``response_class=EventSourceResponse``, one ``asyncio.Queue`` per client, the event's
JSON encoded once per broadcast and yielded as ``raw_data``."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator

import fastapi.routing
from fastapi import FastAPI, Query
from fastapi.sse import EventSourceResponse, ServerSentEvent

from bench.apps.common import add_bench_routes

# FastAPI's keep-alive interval is a module constant; the heartbeat scenario needs it shorter.
fastapi.routing._PING_INTERVAL = float(os.environ.get("BENCH_HEARTBEAT", "15"))  # type: ignore[attr-defined]

app = FastAPI()
channels: dict[str, set[asyncio.Queue[tuple[str, str]]]] = {}
users: dict[str, asyncio.Queue[tuple[str, str]]] = {}
ids = itertools.count(1)
connected = 0


def broadcast(channel: str, data: str) -> None:
    item = (data, str(next(ids)))
    for queue in channels.get(channel, ()):
        queue.put_nowait(item)


def send_to_user(user: str, data: str) -> bool:
    queue = users.get(user)
    if queue is None:
        return False
    queue.put_nowait((data, str(next(ids))))
    return True


@app.get("/sse", response_class=EventSourceResponse)
async def sse(channel: list[str] = Query(["bench"]), user: str | None = None) -> AsyncIterator[ServerSentEvent]:
    global connected
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for name in channel:
        channels.setdefault(name, set()).add(queue)
    if user is not None:
        users[user] = queue
    connected += 1
    try:
        while True:
            data, event_id = await queue.get()
            yield ServerSentEvent(raw_data=data, event="bench", id=event_id)
    finally:
        connected -= 1
        for name in channel:
            channels[name].discard(queue)
        if user is not None and users.get(user) is queue:
            del users[user]


add_bench_routes(app, broadcast=broadcast, send_to_user=send_to_user, clients=lambda: connected)
