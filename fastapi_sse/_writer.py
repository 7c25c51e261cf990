"""Writing to idle streams from one task, without waking a task per client.

A stream's handler task parks once it has written everything. Frames queued for a
parked stream are written by the service's writer task, which calls the stream's
ASGI ``send`` and runs the coroutine by hand: with uvicorn the call finishes
without suspending unless the socket's buffer is full. A send that does suspend
(flow control, a middleware that awaits) is handed, half-run, to the stream's own
task, which finishes it and takes over until it parks again. So a broadcast to
10,000 idle streams costs 10,000 calls in one task instead of 10,000 task wake-ups,
and frames published in the same loop iteration still leave in one write.
"""

from __future__ import annotations

import asyncio
import math
from bisect import bisect_left
from collections.abc import Awaitable, Coroutine, Generator
from contextvars import Context
from time import monotonic
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from fastapi_sse.stats import LATENCY_BUCKETS

if TYPE_CHECKING:
    from starlette.types import Send

    from fastapi_sse._counters import Counters
    from fastapi_sse.client import SSEClient

_YIELD_EVERY = 512
"""Streams written before the writer lets other tasks run."""

_SETTLE_TURNS = 16
"""Loop turns :meth:`Writer.settled` waits at most, so a writer kept busy by other
sources does not stop a burst for ever."""


class Handoff:
    """A send the writer started and the stream's task must finish: ``await`` it."""

    __slots__ = ("coro", "count", "created", "error", "size", "waiting")

    def __init__(
        self,
        coro: Coroutine[Any, Any, None],
        waiting: Any,
        error: Exception | None,
        count: int,
        size: int,
        created: float,
    ) -> None:
        self.coro = coro
        self.waiting = waiting
        self.error = error
        self.count = count
        self.size = size
        self.created = created

    def __await__(self) -> Generator[Any, Any, None]:
        # What ``yield from coro`` would do, starting where the writer stopped.
        if self.error is not None:
            raise self.error
        coro, waiting = self.coro, self.waiting
        while True:
            try:
                sent = yield waiting
            except BaseException as exc:
                try:
                    waiting = coro.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                waiting = coro.send(sent)
            except StopIteration:
                return

    def close(self) -> None:
        """Abandon the send (its stream ended before finishing it)."""
        self.coro.close()


async def _awaiting(awaitable: Awaitable[None]) -> None:
    await awaitable


class Outlet:
    """The writing side of one running stream: how to send to it, and whether its
    task is parked (every frame written; the task waits in ``receive`` for the
    disconnect). While it is parked, :meth:`SSEClient.push` hands it to the writer,
    which calls ``send`` in ``context``; a send it cannot finish becomes
    :attr:`handoff`. :meth:`wake` ends the park by cancelling that wait, and sets
    :attr:`woken` so that the stream knows the cancellation was its own."""

    __slots__ = (
        "behind",
        "cancelled",
        "client",
        "context",
        "handoff",
        "last_write",
        "parked",
        "queued",
        "send",
        "sending",
        "task",
        "woken",
        "writer",
    )

    def __init__(self, client: SSEClient, writer: Writer) -> None:
        self.client = client
        self.writer = writer
        self.send: Send | None = None
        self.context: Context | None = None
        self.task: asyncio.Task[Any] | None = None
        self.parked = False
        self.woken = False
        self.queued = False
        self.handoff: Handoff | None = None
        # True once abandon() cancelled the stream's task, stuck in a send.
        self.cancelled = False
        self.sending = False
        self.last_write = 0.0
        # A run viewer whose buffer overflowed: the sequence number after which it
        # catches up from the run's history before it writes anything else.
        self.behind: int | None = None

    def ready(self) -> None:
        self.queued = True
        self.writer.add(self)

    def wake(self) -> None:
        if self.parked:
            self.parked = False
            if self.task is not None:
                self.woken = True
                self.task.cancel()

    def abandon(self) -> None:
        if self.handoff is not None:
            # A send the writer left half-done for the stream's task, which has not
            # resumed yet: the client is gone, drop it.
            self.handoff.close()
            self.handoff = None
        # A send to a client that stopped reading would wait for ever: cancel it.
        if self.sending and self.task is not None and not self.cancelled:
            self.cancelled = True
            self.task.cancel()
        self.wake()


class Writer:
    """The service's writer task and its queue of parked streams with frames to write."""

    def __init__(self, counters: Counters) -> None:
        self._counters = counters
        self._ready: list[Outlet] = []
        self._wake = asyncio.Event()
        self._writing = False

    @property
    def busy(self) -> bool:
        """Whether parked streams have frames the writer has not written yet."""
        return self._writing or bool(self._ready)

    async def settled(self) -> None:
        """Let the writer run, and return once it has written what was queued (or after
        a few loop turns): a burst of deliveries awaits it between batches."""
        await asyncio.sleep(0)
        for _ in range(_SETTLE_TURNS):
            if not self.busy:
                return
            await asyncio.sleep(0)

    def add(self, outlet: Outlet) -> None:
        """Queue a parked stream that has frames (see :meth:`Outlet.ready`)."""
        self._ready.append(outlet)
        if len(self._ready) == 1:
            self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._ready:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._ready = self._ready, []
            self._writing = True
            try:
                for start in range(0, len(batch), _YIELD_EVERY):
                    if start:
                        await asyncio.sleep(0)
                    self._write(batch[start : start + _YIELD_EVERY], loop.time())
            finally:
                self._writing = False

    def _write(self, outlets: list[Outlet], now: float) -> None:
        """One ``send`` of what each parked stream of ``outlets`` has buffered. This runs
        once per stream of every broadcast: it is written for speed (one loop, the
        counters added up at the end)."""
        counters = self._counters
        buckets = counters.latency_buckets
        events = size = 0
        latencies = 0.0
        # The bucket of the last latency and its bounds: a broadcast's writes mostly
        # fall in the same bucket one after the other.
        bucket, low, high = 0, -1.0, 0.0
        try:
            for outlet in outlets:
                outlet.queued = False
                if outlet.behind is not None:
                    outlet.wake()  # its own task catches up from history first
                    continue
                client = outlet.client
                if not outlet.parked or client.closed or not client.buffered_bytes:
                    continue
                send, context = outlet.send, outlet.context
                if send is None or context is None:
                    outlet.wake()
                    continue
                chunk, count, created = client.take()
                result = send({"type": "http.response.body", "body": chunk, "more_body": True})
                coro = result if type(result) is CoroutineType or isinstance(result, Coroutine) else _awaiting(result)
                try:
                    waiting = context.run(coro.send, None)
                except StopIteration:
                    outlet.last_write = now
                    events += count
                    size += len(chunk)
                    if created:
                        latency = monotonic() - created
                        if not low < latency <= high:
                            bucket = bisect_left(LATENCY_BUCKETS, latency)
                            low = LATENCY_BUCKETS[bucket - 1] if bucket else -1.0
                            high = LATENCY_BUCKETS[bucket] if bucket < len(LATENCY_BUCKETS) else math.inf
                        buckets[bucket] += 1
                        latencies += latency
                    continue
                except Exception as exc:
                    # The stream's task raises it, as if its own send had failed.
                    outlet.handoff = Handoff(coro, None, exc, count, len(chunk), created)
                else:
                    outlet.handoff = Handoff(coro, waiting, None, count, len(chunk), created)
                outlet.wake()
        finally:
            counters.events_sent += events
            counters.bytes_sent += size
            counters.latency_sum += latencies
