"""The publishing path: from any thread to the backend, in order, never blocking.

Publishes from other threads are queued and dispatched on the loop. An in-process
backend delivers each publish at once, up to a budget of events and bytes per loop
turn; the rest of a burst waits in the same queue and is dispatched a batch per
turn once the streams' writer has written the previous one, so a fast reader is not
taken for a slow consumer because a whole burst landed in its buffer before any
write could run. A remote backend gets fire-and-forget publishes through its
outbox (:mod:`fastapi_sse._outbox`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any

from fastapi_sse._counters import Counters
from fastapi_sse._outbox import Outbox
from fastapi_sse._threads import LoopThread
from fastapi_sse._writer import Writer
from fastapi_sse.backends.base import Backend, Message, Publication
from fastapi_sse.errors import BackendError, ServiceNotRunningError
from fastapi_sse.settings import SSESettings

logger = logging.getLogger("fastapi_sse")

_TURN_EVENTS = 256
"""Events an in-process backend delivers per loop turn before the rest waits a turn."""

_WRITER_WAIT_TURNS = 8
"""Turns the rest of a burst waits at most for the writer to write the previous batch
(a writer kept busy by other streams does not hold a burst back for ever)."""


class Publisher:
    """Hands a service's events to its backend; see the module's docstring."""

    def __init__(self, backend: Backend, counters: Counters, settings: SSESettings, writer: Writer) -> None:
        self._backend = backend
        self._counters = counters
        # A quarter of a client's buffer per loop turn: a burst never fills one at once.
        self._turn_limit = settings.max_buffer_bytes // 4
        self._writer = writer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = LoopThread()
        # Publishes waiting for the loop: from other threads, and (in-process backend)
        # the rest of a burst beyond this turn's budget; a future marks the place of
        # an awaited publish that waits for what is queued before it.
        self._queued: deque[Publication | asyncio.Future[None]] = deque()
        self._scheduled = False
        self._waited_turns = 0
        self._turn_started = False
        self._turn_events = 0
        self._turn_bytes = 0
        # Fire-and-forget publishes to a remote backend wait in its outbox.
        self._outbox = Outbox(backend, counters, settings) if backend.remote else None

    def start(self, threads: LoopThread, spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        """Bind to the loop the service runs on (called on it); ``spawn`` runs the
        outbox's task for a remote backend."""
        self._threads = threads
        self._loop = threads.loop
        if self._outbox is not None:
            spawn(self._outbox.run())

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise ServiceNotRunningError("the publisher is not started: start the SSE service first")
        return self._loop

    @property
    def pending(self) -> int:
        """Publishes waiting for the backend."""
        return 0 if self._outbox is None else self._outbox.pending

    # -- fire-and-forget ---------------------------------------------------------------

    def publish_nowait(self, publication: Publication) -> None:
        """Publish without waiting, from any thread."""
        loop = self._running_loop()
        if not self._threads.on_loop():
            self._queued.append(publication)
            if not self._scheduled:
                self._scheduled = True
                loop.call_soon_threadsafe(self._run_queue)
            return
        if self._queued:
            # Behind publishes that are still queued: keep the order.
            self._queued.append(publication)
            self._schedule()
        elif self._outbox is not None:
            self._outbox.add(publication)
        elif self._within_budget():
            self._deliver(publication)
        else:
            self._queued.append(publication)
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._run_queue)

    def _run_queue(self) -> None:
        self._scheduled = False
        queue = self._queued
        if self._outbox is None:
            # Let the writer write the previous batch first (for a few turns at most).
            if self._writer.busy and self._waited_turns < _WRITER_WAIT_TURNS:
                self._waited_turns += 1
                self._schedule()
                return
            self._waited_turns = 0
        while queue:
            entry = queue[0]
            if isinstance(entry, asyncio.Future):
                queue.popleft()
                if not entry.done():
                    entry.set_result(None)
            elif self._outbox is not None:
                queue.popleft()
                self._outbox.add(entry)
            elif self._within_budget():
                queue.popleft()
                self._deliver(entry)
            else:
                break
        if queue:
            self._schedule()

    def _within_budget(self) -> bool:
        return self._turn_events < _TURN_EVENTS and self._turn_bytes < self._turn_limit

    def _spend(self, size: int) -> None:
        if not self._turn_started and self._loop is not None:
            self._turn_started = True
            self._loop.call_soon(self._end_turn)
        self._turn_events += 1
        self._turn_bytes += size

    def _end_turn(self) -> None:
        self._turn_started = False
        self._turn_events = self._turn_bytes = 0

    def _deliver(self, publication: Publication) -> None:
        """Publish on the in-process backend now (it delivers synchronously)."""
        self._spend(len(publication.payload))
        self._backend.publish_nowait(
            publication.channel,
            publication.payload,
            publication.event_id,
            store=publication.store,
            index=publication.index,
        )
        self._counters.published += 1

    # -- awaited ---------------------------------------------------------------------------

    async def publish(
        self, channel: str, payload: bytes, event_id: str | None, *, store: bool, index: Collection[str] = ()
    ) -> str:
        """Publish and return the event's id once the backend has taken it; raises
        :class:`BackendError` when it cannot."""
        messages = await self.publish_many([Publication(channel, payload, event_id, store, index)])
        return messages[0].id

    async def publish_many(self, publications: Sequence[Publication]) -> list[Message]:
        """Publish a batch, in order, after what this thread published without waiting;
        return the messages once the backend has taken them all. Raises
        :class:`BackendError` when it cannot (a prefix may have been published)."""
        loop = self._running_loop()
        if not self._threads.on_loop():
            future = asyncio.run_coroutine_threadsafe(self.publish_many(publications), loop)
            return await asyncio.wrap_future(future)
        if not publications:
            return []
        await self._behind_queued()
        try:
            if self._backend.remote:
                messages = await self._backend.publish_many(publications)
            else:
                # An in-process backend delivers as it publishes: a batch at a time,
                # with the writer running in between (see the module's docstring).
                messages = []
                for start in range(0, len(publications), _TURN_EVENTS):
                    if start:
                        await self._writer.settled()
                    messages += await self._backend.publish_many(publications[start : start + _TURN_EVENTS])
        except Exception as exc:
            self._counters.publish_failures += len(publications)
            self._counters.backend_errors += 1
            if isinstance(exc, BackendError):
                raise
            raise BackendError(f"could not publish to channel {publications[0].channel!r}: {exc}") from exc
        self._counters.published += len(publications)
        return messages

    async def _behind_queued(self) -> None:
        """Wait until what this thread published without waiting is published (or, for
        a remote backend, sent), so that one task's events keep their order; not while
        a remote backend is unreachable: then the awaited publish fails at once."""
        if self._outbox is None:
            if self._queued:
                marker = self._running_loop().create_future()
                self._queued.append(marker)
                self._schedule()
                await marker
            return
        self._run_queue()
        await self._outbox.caught_up()

    def _run_everything_queued(self) -> None:
        while self._queued:
            entry = self._queued.popleft()
            if isinstance(entry, asyncio.Future):
                if not entry.done():
                    entry.set_result(None)
            elif self._outbox is not None:
                self._outbox.add(entry)
            else:
                self._deliver(entry)

    async def flush(self, grace: float) -> None:
        """Publish what waits for the loop, then wait up to ``grace`` seconds for a
        remote backend's outbox to be sent; what is left is counted as lost."""
        self._run_everything_queued()
        if self._outbox is not None:
            await self._outbox.flush(grace)
