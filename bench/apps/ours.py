"""This library set up as the quick start shows: ``include_router(create_sse_router(...))``
and nothing else, every setting read from ``SSE_*`` variables (the service's lifespan
wraps the app in :class:`fastapi_sse.SSEMiddleware` itself).

``BENCH_TUNE_GC=1`` applies :func:`fastapi_sse.tune_gc` once the service is running;
``BENCH_SSE_MIDDLEWARE=1`` adds :class:`fastapi_sse.SSEMiddleware` by hand instead
(the ``ours-middleware`` variant).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

import fastapi_sse
from bench.apps.common import add_bench_routes, dumps, payload, spawn
from fastapi_sse import (
    SSEClient,
    SSEMiddleware,
    SSEService,
    Text,
    allow_all,
    create_sse_router,
    get_sse_from_app,
)

users: dict[str, str] = {}


def remember_user(request: Request, client: SSEClient, sse: SSEService) -> None:
    user = request.query_params.get("user")
    if user is not None:
        users[user] = client.id


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if os.environ.get("BENCH_TUNE_GC") == "1":
        fastapi_sse.tune_gc()
    yield


app = FastAPI(lifespan=lifespan)
app.include_router(create_sse_router(authorize=allow_all, on_connect=remember_user, subscribe_path="/sse"))
if os.environ.get("BENCH_SSE_MIDDLEWARE") == "1":
    app.add_middleware(SSEMiddleware)


def broadcast(channel: str, data: str) -> None:
    get_sse_from_app(app).broadcast(channel, "bench", Text(data))


def send_to_user(user: str, data: str) -> bool:
    client_id = users.get(user)
    return client_id is not None and get_sse_from_app(app).send_to(client_id, "bench", Text(data))


add_bench_routes(
    app,
    broadcast=broadcast,
    send_to_user=send_to_user,
    clients=lambda: len(get_sse_from_app(app).get_clients()),
)


bursts: dict[str, dict[str, Any]] = {}


async def publish_burst(label: str, n: int, users: int, size: int, start: int, one_at_a_time: bool) -> None:
    """``n`` events round-robin on ``user:<k>``: fire-and-forget ``broadcast`` calls in
    one loop that never yields (a burst from one handler), or each awaited with
    ``publish`` (one script round trip at a time, what the outbox used to do). Timed
    until the backend has taken the last one."""
    sse = get_sse_from_app(app)
    pad = "x" * size
    before, head = sse.stats(), await sse.backend.head()
    started = time.perf_counter()
    for k in range(n):
        data = Text(dumps(payload(start + k, pad)))
        if one_at_a_time:
            await sse.publish(f"user:{k % users}", "bench", data)
        else:
            sse.broadcast(f"user:{k % users}", "bench", data)
    # Done when Redis holds them all (a cheap GET); stats() (costly with thousands of
    # channels) only now and then, in case some were lost.
    checks = 0
    while await sse.backend.head() - head < n:
        checks += 1
        if not checks % 50 and not sse.stats().pending_publishes:
            break
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - started
    after = sse.stats()
    bursts[label] = {
        "seconds": elapsed,
        "stored": await sse.backend.head() - head,
        "publish_failures": after.publish_failures - before.publish_failures,
    }


@app.post("/publish_burst")
async def start_burst(
    label: str, n: int, users: int, size: int = 64, start: int = 0, one_at_a_time: bool = False
) -> dict[str, Any]:
    bursts.pop(label, None)
    spawn(publish_burst(label, n, users, size, start, one_at_a_time))
    return {"ok": True}


@app.get("/publish_burst")
async def burst_result(label: str) -> dict[str, Any]:
    """The burst's figures once its last event was taken, else ``{}``."""
    return bursts.get(label, {})
