"""The memory floor: a bare ASGI app on uvicorn that holds idle streams.

A stream sends its headers and a first comment, then waits in ``receive()`` for the
disconnect; nothing else is kept. What a connection costs here is uvicorn's own
(protocol, request cycle, parser, transport, task); ``/stats`` is the same as the
other apps'. It can hold streams but not publish: only the idle scenario applies.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from bench.peers.shared import Bench

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

connected = 0


def _nothing(channel: str, data: str) -> None:
    return None


bench = Bench(broadcast=_nothing, send_to_user=lambda user, data: False, clients=lambda: connected)


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    global connected
    if scope["type"] != "http":
        return
    if scope["path"] == "/sse":
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": b": hello\n\n", "more_body": True})
        connected += 1
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        finally:
            connected -= 1
        return
    handler = bench.route(scope["method"], scope["path"])
    query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
    body = json.dumps(handler(query) if handler else {"error": "not found"}).encode()
    await send({"type": "http.response.start", "status": 200 if handler else 404, "headers": []})
    await send({"type": "http.response.body", "body": body})
