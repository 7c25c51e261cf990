"""aiohttp + aiohttp-sse, the usual way: one ``asyncio.Queue`` per client, a handler
that awaits it inside ``sse_response`` and sends each item with ``resp.send``; the
event's JSON encoded once per broadcast (aiohttp-sse frames it per client).

Usage: ``python -m bench.peers.aiohttp_sse_app PORT`` (on uvloop, one process).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys

import uvloop
from aiohttp import web
from aiohttp_sse import sse_response

from bench.peers.shared import Bench

HEARTBEAT = float(os.environ.get("BENCH_HEARTBEAT", "15"))

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


bench = Bench(broadcast=broadcast, send_to_user=send_to_user, clients=lambda: connected)


async def sse(request: web.Request) -> web.StreamResponse:
    global connected
    names = request.query.getall("channel", ["bench"])
    user = request.query.get("user")
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for name in names:
        channels.setdefault(name, set()).add(queue)
    if user is not None:
        users[user] = queue
    connected += 1
    try:
        async with sse_response(request, ping_interval=HEARTBEAT) as response:
            while response.is_connected():
                data, event_id = await queue.get()
                await response.send(data, id=event_id, event="bench")
        return response
    finally:
        connected -= 1
        for name in names:
            channels[name].discard(queue)
        if user is not None and users.get(user) is queue:
            del users[user]


async def other(request: web.Request) -> web.StreamResponse:
    handler = bench.route(request.method, request.path)
    if handler is None:
        raise web.HTTPNotFound()
    return web.json_response(handler(request.query))


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/sse", sse)
    app.router.add_route("*", "/{tail:.*}", other)
    return app


if __name__ == "__main__":
    port = int(sys.argv[1])
    web.run_app(make_app(), host="127.0.0.1", port=port, backlog=8192, print=None, loop=uvloop.new_event_loop())
