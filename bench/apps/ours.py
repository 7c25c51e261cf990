"""This library set up as the quick start shows: ``include_router(create_sse_router(...))``
and nothing else, every setting read from ``SSE_*`` variables (the service's lifespan
wraps the app in :class:`fastapi_sse.SSEMiddleware` itself).

``BENCH_TUNE_GC=1`` applies :func:`fastapi_sse.tune_gc` once the service is running;
``BENCH_SSE_MIDDLEWARE=1`` adds :class:`fastapi_sse.SSEMiddleware` by hand instead
(the ``ours-middleware`` variant).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

import fastapi_sse
from bench.apps.common import add_bench_routes
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
