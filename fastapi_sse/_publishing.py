"""The publishing path: from any thread to the backend, in order, never blocking.

Publishes from other threads are queued and dispatched on the loop. An in-process
backend delivers each publish at once, up to a budget of events and bytes per loop
turn; the rest of a burst waits in the same queue and is dispatched a batch per
turn once the streams' writer has written the previous one, so a fast reader is not
taken for a slow consumer because a whole burst landed in its buffer before any
write could run. A remote backend gets fire-and-forget publishes through an outbox
that one task sends in batches (everything queued, one round trip), in order,
retrying; the outbox is bounded in bytes only while the backend is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any

from fastapi_sse._counters import Counters
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

_ROUND_TRIP_EVENTS = 20_000
_ROUND_TRIP_BYTES = 16 * 2**20
"""At most this much of the outbox per round trip: a batch that fails is sent again
whole, and the backend holds it in memory twice while it sends it."""

_EVENT_OVERHEAD = 64
"""Bytes counted for a queued event beyond its payload and channel (its id, its
place in the queue)."""

_REPORT_INTERVAL = 1.0
_REPORT_QUIET = 0.1
"""Lost events are logged once a burst of losses has ended (no loss for
``_REPORT_QUIET`` seconds), or ``_REPORT_INTERVAL`` seconds after the first."""


def _size(publication: Publication) -> int:
    return len(publication.payload) + len(publication.channel) + _EVENT_OVERHEAD


class Publisher:
    """Hands a service's events to its backend; see the module's docstring."""

    def __init__(self, backend: Backend, counters: Counters, settings: SSESettings, writer: Writer) -> None:
        self._backend = backend
        self._counters = counters
        self._outbox_limit = settings.publish_buffer_bytes
        self._outbox_events_limit = settings.publish_buffer_size
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
        # The outbox of a remote backend: queued, and the batch being sent.
        self._outbox: deque[Publication] = deque()
        self._sending: list[Publication] = []
        self._outbox_bytes = 0
        self._sending_bytes = 0
        self._outbox_wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._reachable = True
        self._entered = 0  # publications ever put in the outbox
        self._settled = 0  # of those, sent or counted as lost
        self._unreported = 0
        self._unreported_why = ""
        self._report: asyncio.TimerHandle | None = None
        self._first_unreported = self._last_loss = 0.0

    def start(self, threads: LoopThread, spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        """Bind to the loop the service runs on (called on it); ``spawn`` runs the
        outbox's task for a remote backend."""
        self._threads = threads
        self._loop = threads.loop
        if self._backend.remote:
            spawn(self._drain())

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise ServiceNotRunningError("the publisher is not started: start the SSE service first")
        return self._loop

    @property
    def pending(self) -> int:
        """Publishes waiting for the backend."""
        return len(self._outbox) + len(self._sending)

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
        elif self._backend.remote:
            self._to_outbox(publication)
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
        if not self._backend.remote:
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
            elif self._backend.remote:
                queue.popleft()
                self._to_outbox(entry)
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

    def _to_outbox(self, publication: Publication) -> None:
        self._counters.published += 1
        size = _size(publication)
        if not self._reachable:
            full = self._outbox_bytes + size > self._outbox_limit
            if self._outbox_events_limit is not None and self.pending >= self._outbox_events_limit:
                full = True
            if full:
                self._lose(
                    1,
                    f"the backend is unreachable and the outbox is full ({self.pending} events, "
                    f"{self._outbox_bytes} bytes of publish_buffer_bytes={self._outbox_limit})",
                )
                return
        self._outbox.append(publication)
        self._outbox_bytes += size
        self._entered += 1
        self._outbox_wake.set()

    def _lose(self, count: int, why: str) -> None:
        """Count lost events; report them in one line per burst, at most once a second."""
        self._counters.publish_failures += count
        self._unreported_why = why
        if self._loop is None:
            return
        now = self._loop.time()
        if not self._unreported:
            self._first_unreported = now
        self._unreported += count
        self._last_loss = now
        if self._report is None:
            self._report = self._loop.call_later(_REPORT_QUIET, self._report_losses)

    def _report_losses(self, *, now: bool = False) -> None:
        self._report = None
        if not self._unreported or self._loop is None:
            return
        time = self._loop.time()
        # Wait for the burst to end (a moment without losses), a second at most.
        if not now and time - self._last_loss < _REPORT_QUIET and time - self._first_unreported < _REPORT_INTERVAL:
            self._report = self._loop.call_later(_REPORT_QUIET, self._report_losses)
            return
        logger.error("%d event(s) lost: %s", self._unreported, self._unreported_why)
        self._unreported = 0

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
        if not self._backend.remote:
            if self._queued:
                marker = self._running_loop().create_future()
                self._queued.append(marker)
                self._schedule()
                await marker
            return
        self._run_queue()
        ticket = self._entered
        while self._settled < ticket and self._reachable:
            self._progress.clear()
            await self._progress.wait()

    # -- the outbox task ---------------------------------------------------------------------

    async def _drain(self) -> None:
        """Send the outbox to a remote backend in batches, in order, retrying (the
        service's task). A batch that failed is sent again as it was, with the same
        publication keys, so a backend can tell what it already stored."""
        delay = 0.05
        while True:
            if not self._sending:
                if not self._outbox:
                    self._outbox_wake.clear()
                    await self._outbox_wake.wait()
                    continue
                self._sending = self._take_batch()
            try:
                await self._backend.publish_many(self._sending)
            except Exception as exc:
                self._counters.backend_errors += 1
                if self._reachable:
                    self._reachable = False
                    logger.warning(
                        "publishing failed (%s); %d event(s) wait in the outbox and are sent again, "
                        "in order, when the backend answers",
                        exc,
                        self.pending,
                    )
                self._progress.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            if not self._reachable:
                self._reachable = True
                logger.warning("publishing works again; %d event(s) still in the outbox", self.pending)
            self._done_sending()

    def _take_batch(self) -> list[Publication]:
        outbox = self._outbox
        batch: list[Publication] = []
        size = 0
        while outbox and len(batch) < _ROUND_TRIP_EVENTS and size < _ROUND_TRIP_BYTES:
            publication = outbox.popleft()
            batch.append(publication)
            size += len(publication.payload) + len(publication.channel) + _EVENT_OVERHEAD
        self._sending_bytes = size
        return batch

    def _done_sending(self) -> None:
        self._outbox_bytes -= self._sending_bytes
        self._settled += len(self._sending)
        self._sending = []
        self._progress.set()

    async def flush(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for queued publishes to reach the backend; count
        what is left as lost."""
        self._run_everything_queued()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self.pending:
                    self._progress.clear()
                    await self._progress.wait()
        if self.pending:
            self._lose(self.pending, "still waiting for the backend at shutdown")
            self._settled += self.pending
            self._outbox.clear()
            self._sending = []
            self._outbox_bytes = 0
            self._progress.set()
        if self._report is not None:
            self._report.cancel()
        self._report_losses(now=True)

    def _run_everything_queued(self) -> None:
        while self._queued:
            entry = self._queued.popleft()
            if isinstance(entry, asyncio.Future):
                if not entry.done():
                    entry.set_result(None)
            elif self._backend.remote:
                self._to_outbox(entry)
            else:
                self._deliver(entry)
