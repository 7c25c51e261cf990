"""The floor for one Python worker: a raw ASGI app, no framework.

A stream sends its headers, joins its channels and waits in ``receive()`` for the
disconnect. A broadcast frames the event once (``id``/``event``/``data``) and calls
``send`` with the same ``bytes`` for every stream of the channel, one after the other
in the publishing task (``await send(...)``, which with uvicorn writes to the socket
unless its buffer is full): one write per socket and nothing else. No buffer, no
backpressure, no heartbeat, no ids kept: what any library adds is above this.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from bench.peers.shared import Bench

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

channels: dict[str, set[Send]] = {}
users: dict[str, Send] = {}
ids = itertools.count(1)
connected = 0


def frame(data: str) -> dict[str, Any]:
    body = f"id: {next(ids)}\nevent: bench\ndata: {data}\n\n".encode()
    return {"type": "http.response.body", "body": body, "more_body": True}


async def broadcast(channel: str, data: str) -> None:
    streams = channels.get(channel)
    if streams:
        message = frame(data)
        for send in list(streams):
            await send(message)


async def send_to_user(user: str, data: str) -> bool:
    send = users.get(user)
    if send is None:
        return False
    await send(frame(data))
    return True


bench = Bench(broadcast=broadcast, send_to_user=send_to_user, clients=lambda: connected)


def query_of(scope: dict[str, Any]) -> dict[str, list[str]]:
    return parse_qs(scope.get("query_string", b"").decode())


async def stream(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    global connected
    query = query_of(scope)
    names = query.get("channel", ["bench"])
    user = query.get("user", [None])[0]
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": b": hello\n\n", "more_body": True})
    for name in names:
        channels.setdefault(name, set()).add(send)
    if user is not None:
        users[user] = send
    connected += 1
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    finally:
        connected -= 1
        for name in names:
            channels[name].discard(send)
        if user is not None and users.get(user) is send:
            del users[user]


async def respond(send: Send, value: dict[str, Any], status: int = 200) -> None:
    body = json.dumps(value).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/sse":
        await stream(scope, receive, send)
        return
    handler = bench.route(scope["method"], scope["path"])
    if handler is None:
        await respond(send, {"error": "not found"}, 404)
        return
    await respond(send, handler({k: v[0] for k, v in query_of(scope).items()}))
