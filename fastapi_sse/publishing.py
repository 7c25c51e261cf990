"""The publishing path: from any thread to the backend, in order, never blocking.

Publishes from the event loop's thread reach an in-process backend directly.
Publishes from other threads are queued and dispatched on the loop a batch per
turn. Publishes a remote backend cannot take now wait in a bounded outbox that one
task drains in order, retrying.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Collection

from fastapi_sse.backends.base import Backend
from fastapi_sse.errors import BackendError, ServiceNotRunningError
from fastapi_sse.stats import Counters

logger = logging.getLogger("fastapi_sse")

_THREAD_BATCH = 64
"""Publishes from other threads dispatched per loop turn."""

_Publish = tuple[str, bytes, str | None, bool, Collection[str]]


class Publisher:
    """Hands a service's events to its backend; see the module's docstring."""

    def __init__(self, backend: Backend, counters: Counters, *, outbox_size: int) -> None:
        self._backend = backend
        self._counters = counters
        self._outbox_size = outbox_size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._from_threads: deque[_Publish] = deque()
        self._threads_scheduled = False
        self._outbox: deque[_Publish] = deque()
        self._outbox_wake = asyncio.Event()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the loop the service runs on; called from that loop."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise ServiceNotRunningError("the publisher is not started: start the SSE service first")
        return self._loop

    @property
    def pending(self) -> int:
        """Publishes waiting for the backend."""
        return len(self._outbox)

    def publish_nowait(
        self, channel: str, payload: bytes, event_id: str | None, *, store: bool, index: Collection[str] = ()
    ) -> None:
        """Publish without waiting, from any thread; ``index`` as in :meth:`Backend.publish`."""
        loop = self._running_loop()
        if threading.get_ident() == self._loop_thread and not self._from_threads:
            self._dispatch(channel, payload, event_id, store, index)
            return
        # Behind publishes from other threads that are still queued: keep the order.
        self._from_threads.append((channel, payload, event_id, store, index))
        if not self._threads_scheduled:
            self._threads_scheduled = True
            loop.call_soon_threadsafe(self._dispatch_from_threads)

    def _dispatch_from_threads(self) -> None:
        # A burst published from other threads is dispatched a batch per loop turn,
        # so the streams' writers run between batches: a fast reader is not taken
        # for a slow consumer because its buffer filled before any write could run.
        self._threads_scheduled = False
        queue = self._from_threads
        for _ in range(min(len(queue), _THREAD_BATCH)):
            self._dispatch(*queue.popleft())
        if queue and not self._threads_scheduled and self._loop is not None:
            self._threads_scheduled = True
            self._loop.call_soon(self._dispatch_from_threads)

    def _dispatch(
        self, channel: str, payload: bytes, event_id: str | None, store: bool, index: Collection[str]
    ) -> None:
        self._counters.published += 1
        if (
            not self._outbox
            and self._backend.publish_nowait(channel, payload, event_id, store=store, index=index) is not None
        ):
            return
        if len(self._outbox) >= self._outbox_size:
            self._counters.publish_failures += 1
            logger.error(
                "event on channel %r lost: %d publishes are already waiting for the backend (publish_buffer_size)",
                channel,
                len(self._outbox),
            )
            return
        self._outbox.append((channel, payload, event_id, store, index))
        self._outbox_wake.set()

    async def publish(
        self, channel: str, payload: bytes, event_id: str | None, *, store: bool, index: Collection[str] = ()
    ) -> str:
        """Publish and return the event's id once the backend has taken it; raises
        :class:`BackendError` when it cannot."""
        loop = self._running_loop()
        if threading.get_ident() != self._loop_thread:
            future = asyncio.run_coroutine_threadsafe(
                self.publish(channel, payload, event_id, store=store, index=index), loop
            )
            return await asyncio.wrap_future(future)
        try:
            message = await self._backend.publish(channel, payload, event_id, store=store, index=index)
        except BackendError:
            self._counters.publish_failures += 1
            self._counters.backend_errors += 1
            raise
        except Exception as exc:
            self._counters.publish_failures += 1
            self._counters.backend_errors += 1
            raise BackendError(f"could not publish to channel {channel!r}: {exc}") from exc
        self._counters.published += 1
        return message.id

    async def drain(self) -> None:
        """Send the outbox to a remote backend, in order, retrying (the service's task)."""
        delay = 0.05
        while True:
            if not self._outbox:
                self._outbox_wake.clear()
                await self._outbox_wake.wait()
                continue
            channel, payload, event_id, store, index = self._outbox[0]
            try:
                await self._backend.publish(channel, payload, event_id, store=store, index=index)
            except Exception as exc:
                self._counters.backend_errors += 1
                logger.warning(
                    "publish to channel %r failed (%s); %d event(s) waiting, retrying in %.2fs",
                    channel,
                    exc,
                    len(self._outbox),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            self._outbox.popleft()

    async def flush(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the outbox to empty; count what is left."""
        if self._from_threads:
            self._dispatch_from_threads_all()
        if not self._outbox:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self._outbox:  # noqa: ASYNC110 - the drain task empties it
                    await asyncio.sleep(0.01)
        if self._outbox:
            self._counters.publish_failures += len(self._outbox)
            logger.error("%d event(s) could not be published before shutdown", len(self._outbox))
            self._outbox.clear()

    def _dispatch_from_threads_all(self) -> None:
        while self._from_threads:
            self._dispatch(*self._from_threads.popleft())


__all__: list[str] = []  # internal: the service uses it
