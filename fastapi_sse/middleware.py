"""``SSEMiddleware``: what a request that opens a stream needs from outside its route.

The service's lifespan wraps the app in it (outermost), so that both ways of opening
a stream, the router's and a route of the app's own that calls ``add_client``, get
the same three things:

- **The request's cursor.** ``add_client()`` with no ``last_event_id`` reads the
  request's ``Last-Event-ID`` header (as UTF-8, as browsers send it) or, for a first
  connection, its ``last_event_id`` query parameter.
- **No slot kept by a stream that never ran.** A client made by ``add_client`` in a
  request whose response is not the stream (the handler raised its own 400 or 403,
  returned another response) is released as soon as the request ends.
- **The route's frames let go.** An :class:`SSEResponse` writes its headers and
  opening through the whole chain as usual (so CORS and the like add their headers),
  then passes itself to the middleware and returns. The route finishes: dependencies
  with ``yield`` close (a database session is not held for the stream's life), its
  frames and the ``Request`` are freed, and the middleware runs the rest of the
  stream in the same task. Middlewares inside this one do not see the stream's later
  writes. ``SSE_STREAM_OUTSIDE_ROUTE=false`` keeps streams inside their route.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from fastapi_sse.client import SSEClient

SCOPE_KEY = "fastapi_sse.outside_route"

_current: contextvars.ContextVar[Slot | None] = contextvars.ContextVar("fastapi_sse_request", default=None)


class HandedOff(Protocol):
    """A stream the middleware runs once its route has returned (an ``SSEResponse``)."""

    async def resume(self, receive: Receive, send: Send) -> None:
        """Write the rest of the stream."""

    def abandon(self) -> None:
        """The request failed before the stream could run: let its client go."""


class Slot:
    """One request as the middleware sees it: its scope, the clients opened in it,
    and the stream that the middleware runs once the route returns."""

    __slots__ = ("hand_off", "opened", "scope", "send", "stream")

    def __init__(self, scope: Scope, send: Send, *, hand_off: bool) -> None:
        self.scope = scope
        self.send = send
        self.hand_off = hand_off
        self.stream: HandedOff | None = None
        self.opened: list[tuple[SSEClient, Callable[[SSEClient], None]]] | None = None

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

    def release_unstarted(self) -> None:
        """Release every client opened in this request whose stream never started."""
        if self.opened is not None:
            for client, release in self.opened:
                if not client.attached:
                    release(client)
            self.opened = None


class SSEMiddleware:
    """Give each request that opens an SSE stream its cursor, release what it opened
    and never ran, and run its stream outside the route's frames.

    The service's lifespan adds it around the whole app, so nothing needs doing. Adding
    it by hand, ``app.add_middleware(SSEMiddleware)`` last, places it explicitly (the
    lifespan then adds no second one). Requests that are not streams pass through.
    """

    def __init__(self, app: ASGIApp, *, hand_off: bool = True) -> None:
        self.app = app
        self.hand_off = hand_off

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        slot = Slot(scope, send, hand_off=self.hand_off)
        scope[SCOPE_KEY] = slot
        token = _current.set(slot)
        try:
            await self.app(scope, receive, slot.relay)
        except BaseException:
            if slot.stream is not None:
                slot.stream.abandon()
            raise
        finally:
            _current.reset(token)
            slot.release_unstarted()
            scope.pop(SCOPE_KEY, None)
        stream = slot.stream
        del slot, token  # nothing of the request's routing stays alive with the stream
        if stream is None:
            return
        _settle(scope)
        await stream.resume(receive, send)


def _settle(scope: Scope) -> None:
    """Leave in ``scope`` only what the stream's life needs, in a table of its size.

    FastAPI leaves its exit stacks in the scope; they are exited now, and would
    otherwise stay alive (with their deques) for the whole life of the stream. Routing
    also grew the table past what the remaining keys need (24 keys, 832 bytes): the
    dict is rebuilt in place, since the server holds this very object (464 bytes).
    """
    kept = [(k, v) for k, v in scope.items() if k != "fastapi" and not isinstance(v, AsyncExitStack)]
    scope.clear()
    for k, v in kept:
        scope[k] = v


def claim(scope: Scope, stream: HandedOff) -> bool:
    """Pass ``stream`` to the middleware, when there is one that hands streams off and no
    stream took its slot yet."""
    slot: Any = scope.get(SCOPE_KEY)
    if not isinstance(slot, Slot) or not slot.hand_off or slot.stream is not None:
        return False
    slot.stream = stream
    return True


def opened(client: SSEClient, release: Callable[[SSEClient], None]) -> None:
    """Note a client opened in the current request: ``release`` frees it if the request
    ends without its stream having started."""
    slot = _current.get()
    if slot is None:
        return
    if slot.opened is None:
        slot.opened = []
    slot.opened.append((client, release))


def header_text(raw: bytes) -> str:
    """A header value as the client meant it: browsers send ``Last-Event-ID`` as UTF-8."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def last_event_id(scope: Scope) -> str | None:
    """The cursor a request resumes from: its ``Last-Event-ID`` header (sent by
    EventSource on every reconnect), else its ``last_event_id`` query parameter (a
    first connection cannot set headers from a browser)."""
    for name, value in scope.get("headers", ()):
        if name == b"last-event-id":
            text = header_text(value)
            if text:
                return text
            break
    query = scope.get("query_string", b"")
    if query and b"last_event_id=" in query:
        values = parse_qs(header_text(query), keep_blank_values=True).get("last_event_id")
        if values and values[0]:
            return values[0]
    return None


def current_last_event_id() -> str | None:
    """The cursor of the request being handled, or None outside a request."""
    slot = _current.get()
    return None if slot is None else last_event_id(slot.scope)


def install(app: Any, *, hand_off: bool) -> Callable[[], None] | None:
    """Wrap a Starlette app's middleware stack in :class:`SSEMiddleware`, unless the app
    already has one; returns what undoes it."""
    if any(getattr(m, "cls", None) is SSEMiddleware for m in getattr(app, "user_middleware", ())):
        return None
    build = getattr(app, "build_middleware_stack", None)
    if build is None:
        return None
    inner = app.middleware_stack if app.middleware_stack is not None else build()
    if isinstance(inner, SSEMiddleware):
        return None
    wrapped = SSEMiddleware(inner, hand_off=hand_off)
    app.middleware_stack = wrapped

    def uninstall() -> None:
        if app.middleware_stack is wrapped:
            app.middleware_stack = inner

    return uninstall


__all__ = ["SSEMiddleware"]
