"""Fire-and-forget publishes to a remote backend: an outbox one task sends in
batches (everything queued, one round trip), in order, retrying. It is bounded in
bytes only while the backend is unreachable; what it must drop is counted and
logged once per burst."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from fastapi_sse._counters import Counters
from fastapi_sse.backends.base import Backend, Publication
from fastapi_sse.settings import SSESettings

logger = logging.getLogger("fastapi_sse")

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


class Outbox:
    """See the module's docstring."""

    def __init__(self, backend: Backend, counters: Counters, settings: SSESettings) -> None:
        self._backend = backend
        self._counters = counters
        self._outbox_limit = settings.publish_buffer_bytes
        self._outbox_events_limit = settings.publish_buffer_size
        self._loop: asyncio.AbstractEventLoop | None = None
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

    @property
    def pending(self) -> int:
        """Publishes waiting for the backend."""
        return len(self._outbox) + len(self._sending)

    async def caught_up(self) -> None:
        """Wait until what is in the outbox now has been sent (or lost); at once while
        the backend is unreachable."""
        ticket = self._entered
        while self._settled < ticket and self._reachable:
            self._progress.clear()
            await self._progress.wait()

    def add(self, publication: Publication) -> None:
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

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
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
        """Wait up to ``grace`` seconds for the outbox to reach the backend; count what
        is left as lost."""
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
