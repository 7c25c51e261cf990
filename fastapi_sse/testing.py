"""Helpers to test an app's streams the way browsers use them: a real server and a
real SSE client. Needs the ``testing`` extra (uvicorn, httpx, httpx-sse).

    with live_server(app) as url, open_event_stream(url + "/subscribe", params={"channel": "a"}) as events:
        httpx.post(url + "/publish")
        assert events.next_event("notification").json() == {...}
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from httpx_sse import EventSource, ServerSentEvent, connect_sse


@contextmanager
def live_server(app: Any, *, start_timeout: float = 10.0, **config: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port, in a thread; yield its URL.

    On exit the app's SSE streams are ended first (as the service's signal handler
    does under a real server), then uvicorn stops. Extra keyword arguments go to
    :class:`uvicorn.Config`.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config.setdefault("log_level", "warning")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **config))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:  # uvicorn offers a flag, not an event
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        service = getattr(getattr(app, "state", None), "sse", None)
        if service is not None and loop.is_running():
            with contextlib.suppress(Exception):
                loop.call_soon_threadsafe(service.shutdown)
        server.should_exit = True
        thread.join(start_timeout)
        if not thread.is_alive():
            loop.close()


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


__all__ = ["EventReader", "live_server", "open_event_stream"]
