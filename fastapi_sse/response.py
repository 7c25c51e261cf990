"""One connection's stream: an sse-starlette ``EventSourceResponse`` that writes
the shared frames the service queues for its client."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

import anyio
from sse_starlette.sse import EventSourceResponse
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from fastapi_sse.client import DisconnectReason
from fastapi_sse.errors import LimitExceededError
from fastapi_sse.middleware import claim

if TYPE_CHECKING:
    from fastapi_sse._writer import Outlet
    from fastapi_sse.client import SSEClient

_REPLAY_CHUNK = 64 * 1024


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield  # pragma: no cover


# sse-starlette's headers (text/event-stream, no-store, X-Accel-Buffering: no), built once,
# without its ``Connection: keep-alive``: a hop-by-hop header, forbidden on HTTP/2 and
# HTTP/3, redundant on HTTP/1.1 and doubled by the server's own on HTTP/1.0.
_RAW_HEADERS = tuple(
    (name, value) for name, value in EventSourceResponse(_nothing(), ping=0).raw_headers if name != b"connection"
)


class StreamHost(Protocol):
    """What a stream needs from its service (``fastapi_sse._streams.Streams``)."""

    @property
    def hard_refusals(self) -> bool: ...

    def retry_hint(self) -> bytes: ...

    async def claim(self, client: SSEClient) -> None: ...

    def attach(self, client: SSEClient) -> Outlet | None: ...

    async def opening(self, client: SSEClient) -> list[bytes]: ...

    def sent(self, events: int, size: int, created: float = 0.0) -> None: ...

    def disconnected(self, client: SSEClient) -> None: ...

    def detach(self, client: SSEClient, reason: str) -> None: ...

    async def catch_up(self, client: SSEClient, outlet: Outlet) -> list[bytes]: ...

    def serving(self, send: Send) -> None: ...


class SSEResponse(EventSourceResponse):
    """The response :meth:`SSEService.add_client` returns; return it from the handler.

    It keeps sse-starlette's headers (``text/event-stream``, ``Cache-Control``,
    ``X-Accel-Buffering: no``) but replaces its per-connection tasks (ping,
    shutdown watcher, sender): the service sends heartbeats for all clients from
    one task, the service's writer writes frames to idle streams, and the
    handler's own task, once parked, listens for the disconnect. A connection
    costs no task of its own and no per-event encoding.
    """

    media_type = "text/event-stream"
    # What sse-starlette's __init__ sets on every instance, as class defaults: a stream
    # carries only its client, its service and its own header list.
    status_code = 200
    background = None
    sep = "\r\n"
    data_sender_callable = None
    send_timeout = None
    ping_message_factory = None
    client_close_handler_callable = None
    active = True
    _ping_interval = 0
    _shutdown_event = None
    _shutdown_grace_period = 0
    _cleanup_timeout = EventSourceResponse.DEFAULT_CLEANUP_TIMEOUT

    def __init__(self, client: SSEClient, host: StreamHost, *, status_code: int = 200) -> None:
        # Not EventSourceResponse.__init__: it would build the same headers, a lock
        # and a generator for every connection, none of which the stream uses.
        # ``status_code`` is here for FastAPI, which reads a route's default status from
        # the response class's signature (for OpenAPI); a stream is always a 200.
        self.raw_headers = list(_RAW_HEADERS)
        self.client = client
        self.host = host
        self.outlet: Outlet | None = None

    @property
    def body_iterator(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        """Empty: the stream writes the service's frames, not an iterator."""
        return _nothing()

    @functools.cached_property
    def _send_lock(self) -> anyio.Lock:  # type: ignore[override]
        return anyio.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client, host = self.client, self.host
        start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        if scope["type"] != "http" or scope["method"] == "HEAD":
            host.detach(client, DisconnectReason.REMOVED)
            await send(start)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if client.identity is not None and not client.closed:
            try:
                await host.claim(client)
            except LimitExceededError as exc:
                await RefusedStream(client, host, exc)(scope, receive, send)
                return
        outlet = self.outlet = host.attach(client)
        try:
            await send(start)
            if outlet is not None:
                opening = await host.opening(client)
                await _send_chunks(send, opening)
                outlet.last_write = asyncio.get_running_loop().time()
                host.sent(0, sum(map(len, opening)))
        except BaseException:
            self.abandon()
            raise
        if not claim(scope, self):
            await self.resume(receive, send)

    def abandon(self) -> None:
        """Let go of the client: its stream ended before :meth:`resume` (its connection
        failed). Called by :class:`SSEMiddleware`."""
        self.host.detach(self.client, DisconnectReason.CLIENT_CLOSED)

    async def resume(self, receive: Receive, send: Send) -> None:
        """Write the client's events until the stream ends, then the end of the body and
        the response's background task. The headers and the opening are already sent;
        :class:`SSEMiddleware` calls it once the route has returned."""
        client, host = self.client, self.host
        host.serving(send)
        outlet = self.outlet
        if outlet is None:  # closed before it started: nothing to stream
            host.detach(client, client.close_reason or DisconnectReason.CLIENT_CLOSED)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            if self.background is not None:
                await self.background()
            return
        loop = asyncio.get_running_loop()
        # The task that ``wake`` and a stuck send cancel: the one running this loop, not
        # always the one that opened the stream (after SSEMiddleware took it from a
        # BaseHTTPMiddleware, which runs its app in a task of its own).
        task = outlet.task = asyncio.current_task()
        disconnected = False
        reason = DisconnectReason.CLIENT_CLOSED
        try:
            outlet.send = send
            outlet.context = contextvars.copy_context()
            while True:
                handoff = outlet.handoff
                if outlet.behind is not None and handoff is None:
                    # A run viewer that fell behind: what it missed, from history.
                    chunks = await host.catch_up(client, outlet)
                    outlet.sending = True
                    await _send_chunks(send, chunks)
                    outlet.sending = False
                    outlet.last_write = loop.time()
                    host.sent(len(chunks), sum(map(len, chunks)))
                elif handoff is not None:
                    # A send the service's writer started and could not finish.
                    outlet.handoff = None
                    outlet.sending = True
                    await handoff
                    outlet.sending = False
                    outlet.last_write = loop.time()
                    host.sent(handoff.count, handoff.size, handoff.created)
                elif client.buffered_bytes:
                    # ``created``: the oldest event of the write, the longest any in it waited.
                    chunk, count, created = client.take()
                    outlet.sending = True
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    outlet.sending = False
                    outlet.last_write = loop.time()
                    host.sent(count, len(chunk), created)
                elif client.closed:
                    break
                else:
                    # Parked: the service's writer writes what comes next (see _writer.py),
                    # and this task listens for the disconnect. ``wake`` cancels the wait.
                    outlet.parked = True
                    try:
                        message = await receive()
                    except asyncio.CancelledError:
                        if not outlet.woken or task is None or task.uncancel():
                            raise
                        outlet.woken = False
                        continue
                    finally:
                        outlet.parked = False
                    if message["type"] == "http.disconnect":
                        host.disconnected(client)
            reason = client.close_reason or reason
            disconnected = reason == DisconnectReason.CLIENT_CLOSED
        except asyncio.CancelledError:
            # Cancelled by the service because the stream was closed while stuck in a
            # send (its client stopped reading, or went away): end the connection
            # here. Any other cancellation is the server's.
            if not outlet.cancelled or task is None or task.uncancel():
                raise
            disconnected = True
        finally:
            outlet.sending = False
            if outlet.handoff is not None:
                outlet.handoff.close()
                outlet.handoff = None
            host.detach(client, reason)
        if not disconnected:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        if self.background is not None:
            await self.background()


async def _send_chunks(send: Send, chunks: list[bytes]) -> None:
    """Write the opening in pieces of about 64 KiB, so a long replay respects the
    transport's flow control instead of sitting in memory twice."""
    batch: list[bytes] = []
    size = 0
    for chunk in chunks:
        batch.append(chunk)
        size += len(chunk)
        if size >= _REPLAY_CHUNK:
            await send({"type": "http.response.body", "body": b"".join(batch), "more_body": True})
            batch, size = [], 0
    if batch:
        await send({"type": "http.response.body", "body": b"".join(batch), "more_body": True})


class RefusedStream(SSEResponse):
    """The answer to a stream refused for load, a limit or shutdown.

    By default a 200 ``text/event-stream`` that carries this stream's ``retry:`` delay
    and a comment naming the refusal, then ends: a browser's EventSource reconnects
    after the delay (a non-200 answer would switch it off for good). With
    ``hard_refusals`` the HTTP error itself (503 or 429, with ``Retry-After``).
    """

    def __init__(self, client: SSEClient, host: StreamHost, error: LimitExceededError) -> None:
        super().__init__(client, host)
        self.error = error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = self.error
        if self.host.hard_refusals:
            refusal = JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)
            await refusal(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        if scope.get("method") != "HEAD":
            reason = str(error.detail).replace("\r", " ").replace("\n", " ")
            body = self.host.retry_hint() + b": refused: " + reason.encode() + b"\n\n"
            await send({"type": "http.response.body", "body": body, "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


__all__ = ["RefusedStream", "SSEResponse"]
