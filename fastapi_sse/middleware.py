"""``SSEMiddleware``: an open stream lives on outside the route that opened it.

A stream that waits for its next event keeps every frame of the request alive:
FastAPI's routing, its middlewares, the ``Request`` and three exit stacks, about
10 KiB per connection. With this middleware, an :class:`SSEResponse` writes its
headers and opening through the whole chain as usual (so CORS and the like add
their headers), then passes itself to the middleware and returns. The route
finishes, its frames are freed, and the middleware runs the rest of the stream in
the same task.

What changes for the app: dependencies with ``yield`` close when the stream leaves
the route, not when it ends (as with ``Depends(..., scope="function")``), and
middlewares added before this one do not see the stream's later writes.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from fastapi_sse.response import SSEResponse

SCOPE_KEY = "fastapi_sse.outside_route"


class Slot:
    """One request's slot: the stream that the middleware runs once the route returns."""

    __slots__ = ("send", "stream")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.stream: SSEResponse | None = None

    async def relay(self, message: Message) -> None:
        """The route's ``send``. Once the stream has left the route, the route's layers have
        nothing left to write but the end of the body (``BaseHTTPMiddleware`` sends one),
        which the stream writes itself when it ends."""
        if self.stream is None:
            await self.send(message)
        elif message["type"] != "http.response.body" or message.get("body") or message.get("more_body"):
            raise RuntimeError(
                f"a layer inside SSEMiddleware sent {message['type']!r} after the SSE stream left the route; "
                "add SSEMiddleware last, so that it wraps that layer"
            )


class SSEMiddleware:
    """Run each open SSE stream outside the frames of its route: about 10 KiB less
    per connection.

    Add it last, ``app.add_middleware(SSEMiddleware)``, so that it wraps the app's
    other middlewares. A stream sends its headers and opening through every layer,
    then leaves its route and runs on here, in the same task. Dependencies with
    ``yield`` then close when the stream leaves the route, not when it ends, and
    middlewares inside this one do not see the stream's later events. Requests that
    are not streams pass through.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        slot = Slot(send)
        scope[SCOPE_KEY] = slot
        try:
            await self.app(scope, receive, slot.relay)
        except BaseException:
            if slot.stream is not None:
                slot.stream._abandon()
            raise
        stream = slot.stream
        if stream is None:
            return
        del scope[SCOPE_KEY]
        # FastAPI leaves its exit stacks in the scope; they are exited now, and would
        # otherwise stay alive (with their deques) for the whole life of the stream.
        for key in [key for key, value in scope.items() if isinstance(value, AsyncExitStack)]:
            del scope[key]
        await stream._run(receive, send)


def claim(scope: Scope, stream: SSEResponse) -> bool:
    """Pass ``stream`` to the middleware, when there is one and no stream took its slot yet."""
    slot: Any = scope.get(SCOPE_KEY)
    if not isinstance(slot, Slot) or slot.stream is not None:
        return False
    slot.stream = stream
    return True
