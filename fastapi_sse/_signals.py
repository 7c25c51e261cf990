"""Ending a worker's streams: at once, or in waves; and on SIGINT/SIGTERM.

Uvicorn waits for open responses before it runs the app's shutdown, and a stream
never ends on its own: so the service starts ending them as soon as the signal
arrives, then lets the server's own handler run.
"""

from __future__ import annotations

import asyncio
import math
import signal
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

from fastapi_sse.client import SSEClient

_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_DRAIN_STEP = 0.05
"""Seconds between two waves of a drain, at the least."""


async def end_in_waves(clients: list[SSEClient], window: float, end: Callable[[SSEClient], object]) -> None:
    """Call ``end`` on every client, spread evenly over ``window`` seconds, so that
    their reconnects reach the other workers at an even rate."""
    waves = max(1, min(len(clients), round(window / _DRAIN_STEP)))
    size = math.ceil(len(clients) / waves)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for wave in range(waves):
        # Paced from the start, so that a slow wave does not stretch the window.
        await asyncio.sleep(max(0.0, start + wave * window / waves - loop.time()))
        for client in clients[wave * size : (wave + 1) * size]:
            end(client)


def server_stopping(send: Callable[..., object]) -> Callable[[], Awaitable[object]] | None:
    """How to wait for the server's own stop, for a server that stops its worker
    processes without a signal: hypercorn's parent tells its workers through an event,
    and each worker marks its context ``terminated`` before it waits for open
    responses. Found from the server's ``send``; None for any other server."""
    context = getattr(getattr(send, "__self__", None), "context", None)
    terminated = getattr(context, "terminated", None)
    wait = getattr(terminated, "wait", None)
    return wait if callable(wait) and callable(getattr(terminated, "is_set", None)) else None


class ServerStop:
    """Calls ``on_stop`` when a server that stops without a signal to this process
    (:func:`server_stopping`) stops, as SIGTERM would; the server is found from the
    first stream's ``send``."""

    def __init__(self, on_stop: Callable[[], None]) -> None:
        self.on_stop = on_stop
        self._watch: asyncio.Task[None] | None = None
        self._seen = False

    def watch(self, send: Callable[..., object]) -> None:
        if self._seen:
            return
        self._seen = True
        stopping = server_stopping(send)
        if stopping is not None:
            self._watch = asyncio.get_running_loop().create_task(self._stopped(stopping))

    async def _stopped(self, stopping: Callable[[], Awaitable[object]]) -> None:
        await stopping()
        self.on_stop()

    def cancel(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._seen = False


class SignalHandlers:
    """Handlers for SIGINT and SIGTERM that call ``on_signal`` on the loop first."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def install(self, loop: asyncio.AbstractEventLoop | None, on_signal: Callable[[], None]) -> None:
        """Does nothing outside the main thread, or when already installed."""
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for sig in _SIGNALS:
            previous = signal.getsignal(sig)

            def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
                if loop is not None and not loop.is_closed():
                    loop.call_soon_threadsafe(on_signal)
                if callable(previous):
                    previous(signum, frame)
                elif previous == signal.default_int_handler:  # pragma: no cover
                    raise KeyboardInterrupt

            self._previous[sig] = previous
            signal.signal(sig, handler)

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
