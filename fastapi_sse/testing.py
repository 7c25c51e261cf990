"""Helpers to test an app's streams the way browsers use them: a real server and a
real SSE client. Needs the ``testing`` extra (uvicorn, httpx, httpx-sse).

    with live_server(app) as url, open_event_stream(url + "/subscribe", params={"channel": "a"}) as events:
        httpx.post(url + "/publish")
        assert events.next_event("notification").json() == {...}

:func:`running_server` is :func:`live_server` with a :class:`LiveServer` in place of
the URL, for tests that also need the port or to run code on the server's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from httpx_sse import EventSource, ServerSentEvent, connect_sse


class LiveServer:
    """An app served by :func:`running_server`: where it listens, and a way in to
    the event loop it runs on (the loop its SSE service lives on)."""

    def __init__(self, app: Any, port: int, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        """The app being served."""
        self.port = port
        """The loopback port uvicorn listens on."""
        self.loop = loop
        """The event loop the server runs on, in its own thread."""

    @property
    def url(self) -> str:
        """The server's base URL, ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 10.0) -> Any:
        """Run ``fn(*args)`` on the server's event loop and return its result (awaited
        first if it is a coroutine); its exception, if it raises. Waits ``timeout`` seconds
        at most (:class:`TimeoutError` after that)."""

        async def runner() -> Any:
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(runner(), self.loop).result(timeout)


@contextmanager
def running_server(app: Any, *, start_timeout: float = 10.0, **config: Any) -> Iterator[LiveServer]:
    """Serve ``app`` with uvicorn on a free loopback port, in a thread; yield a
    :class:`LiveServer` once uvicorn has started.

    On exit the app's SSE streams are ended first (the service's ``shutdown()`` runs
    on the server's loop, as the service's signal handler does under a real server;
    this waits for it), then uvicorn stops. ``start_timeout`` bounds the start, that
    wait and the stop, each. Extra keyword arguments go to :class:`uvicorn.Config`.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    config.setdefault("log_level", "warning")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **config))
    loop = asyncio.new_event_loop()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve())

    thread = threading.Thread(target=run, daemon=True)

    def stop() -> None:
        server.should_exit = True
        thread.join(start_timeout)
        if not thread.is_alive():
            loop.close()

    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:  # uvicorn offers a flag, not an event
        if not thread.is_alive() or time.monotonic() > deadline:
            stop()
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    live = LiveServer(app, port, loop)
    try:
        yield live
    finally:
        service = getattr(getattr(app, "state", None), "sse", None)
        if service is not None and loop.is_running():
            # Streams are endless: end them before uvicorn waits for its connections.
            with contextlib.suppress(Exception):
                live.call(service.shutdown, timeout=start_timeout)
        stop()


@contextmanager
def live_server(app: Any, *, start_timeout: float = 10.0, **config: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port, in a thread; yield its URL.

    On exit the app's SSE streams are ended first (as the service's signal handler
    does under a real server), then uvicorn stops. Extra keyword arguments go to
    :class:`uvicorn.Config`. :func:`running_server` does the same and yields a
    :class:`LiveServer`.
    """
    with running_server(app, start_timeout=start_timeout, **config) as server:
        yield server.url


class EventReader:
    """Events of one open stream, read in order; comments and the id-only cursor
    frames a browser does not dispatch are skipped."""

    def __init__(self, source: EventSource) -> None:
        self.source = source
        self._events = source.iter_sse()

    def next_event(self, name: str | None = None) -> ServerSentEvent:
        """The next dispatched event (the next one called ``name``, if given). The
        client's read timeout is the deadline."""
        for event in self._events:
            if event.data == "" and event.event == "message":
                continue  # a frame with no data: the browser dispatches nothing
            if name is None or event.event == name:
                return event
        raise EOFError("the stream ended")

    def events(self, count: int) -> list[ServerSentEvent]:
        """The next ``count`` dispatched events."""
        return [self.next_event() for _ in range(count)]


@contextmanager
def open_event_stream(
    url: str,
    *,
    params: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
    client: httpx.Client | None = None,
) -> Iterator[EventReader]:
    """Open ``GET url`` as an event stream; yield an :class:`EventReader`. The stream
    is subscribed when this returns (its headers have arrived)."""
    with contextlib.ExitStack() as stack:
        http = client or stack.enter_context(httpx.Client(timeout=timeout))
        source = stack.enter_context(connect_sse(http, "GET", url, params=params, headers=dict(headers or {})))
        source.response.raise_for_status()
        yield EventReader(source)


__all__ = ["EventReader", "LiveServer", "live_server", "open_event_stream", "running_server"]
