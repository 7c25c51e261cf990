"""The service's side of a running stream: what a response asks of it.

A response attaches its client (the stream started), writes the opening this module
builds (the retry hint, then the cursor or the replay of what the client missed),
counts its writes here, and detaches when it ends, for whatever reason. The service
waits here for the streams still running when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from fastapi_sse import _positions
from fastapi_sse import _wire as wire
from fastapi_sse._cluster import LocalCluster
from fastapi_sse._counters import Counters
from fastapi_sse._names import (
    ALL_CHANNEL,
    is_run_end,
    new_client_id,
    run_channel,
)
from fastapi_sse._opening import gap_frame, opening_each
from fastapi_sse._registry import Registry, readable
from fastapi_sse._replays import SharedReplays
from fastapi_sse._signals import ServerStop
from fastapi_sse._writer import Outlet, Writer
from fastapi_sse.backends.base import Backend
from fastapi_sse.client import DisconnectReason, Frame, SSEClient
from fastapi_sse.errors import LimitExceededError
from fastapi_sse.response import RefusedStream, SSEResponse
from fastapi_sse.settings import SSESettings

if TYPE_CHECKING:
    from starlette.types import Send

logger = logging.getLogger("fastapi_sse")


class Streams:
    """The running streams of one service, and what their responses need from it."""

    def __init__(
        self,
        settings: SSESettings,
        backend: Backend,
        registry: Registry,
        cluster: LocalCluster,
        counters: Counters,
        writer: Writer,
        *,
        worker_id: str,
        on_overflow: Callable[[SSEClient, int], None],
        on_stop: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.on_overflow = on_overflow
        self.server_stop = ServerStop(on_stop)
        self.backend = backend
        # A shared backend's history is read once for the streams that resume together.
        self.replays: Backend | SharedReplays = SharedReplays(backend) if backend.remote else backend
        self.registry = registry
        self.cluster = cluster
        self.counters = counters
        self.writer = writer
        # Clients that view a run: their run's channel, and the cursor they resume from.
        self.run_viewers: dict[str, tuple[str, str | None, int]] = {}
        self._on_detach: dict[str, Callable[[], None]] = {}
        # Streams that started and have not ended yet, for the service's stop to wait on.
        self.running: dict[str, SSEClient] = {}
        self._ended = asyncio.Event()
        self._ended.set()

    def open(self, last_event_id: str | None, identity: str | None) -> tuple[SSEClient, SSEResponse]:
        """A new client, registered, and the response that streams to it."""
        client = self._new_client(last_event_id, identity)
        self.registry.add(client)
        self.counters.connects += 1
        return client, SSEResponse(client, self)

    def refuse(self, error: LimitExceededError) -> tuple[SSEClient, SSEResponse]:
        """A stream refused for load, a limit or shutdown: one that says when to come
        back (``retry:``) and ends, so that a browser's EventSource reconnects later;
        with ``hard_refusals``, the HTTP error, raised."""
        self.counters.refused[error.limit] += 1
        if self.settings.hard_refusals:
            raise error
        client = self._new_client(None, None)
        client.mark_closed(DisconnectReason.REFUSED, discard=True)
        return client, RefusedStream(client, self, error)

    def _new_client(self, last_event_id: str | None, identity: str | None) -> SSEClient:
        client = SSEClient(
            new_client_id(self.worker_id),
            created_at=datetime.now(UTC),
            last_event_id=last_event_id,
            identity=identity,
            buffer_limit=self.settings.max_buffer_bytes,
            policy=self.settings.overflow_policy,
        )
        client.on_overflow = self.on_overflow
        if not self.backend.ordered:
            client.positions = _positions.Positions()
        return client

    @property
    def hard_refusals(self) -> bool:
        return self.settings.hard_refusals

    def retry_hint(self) -> bytes:
        """A ``retry:`` frame with this stream's own delay: ``retry_interval`` spread by
        ``retry_jitter``, so that streams ended together do not come back together."""
        jitter = self.settings.retry_jitter
        base = self.settings.retry_interval
        return wire.retry_frame(base * (1 + jitter * (2 * random.random() - 1)) if jitter else base)

    async def claim(self, client: SSEClient) -> None:
        """Count the stream against its identity's limit across workers; raises
        :class:`LimitExceededError` when it is refused."""
        await self.cluster.claim(client)

    def attach(self, client: SSEClient) -> Outlet | None:
        """Mark a client's stream as started; None when it was closed before."""
        if client.closed:
            return None
        client.attached = True
        outlet = client.outlet = Outlet(client, self.writer)
        self.running[client.id] = client
        self._ended.clear()
        return outlet

    def view_run(
        self,
        client: SSEClient,
        run_id: str,
        cursor: str | None,
        first: int,
        on_detach: Callable[[], None] | None = None,
    ) -> None:
        """Make a new client a viewer of a run: it replays the run from ``cursor`` (from
        its start, after sequence number ``first``, without one), then follows it to
        its end; ``on_detach`` is called when its stream ends, for whatever reason."""
        channel = run_channel(run_id)
        self.registry.subscribe(client, channel)
        self.run_viewers[client.id] = (channel, cursor, first)
        # A viewer that reads slowly is never cut nor loses events: it catches up from
        # the run's history (fall_behind, catch_up).
        client.overflow_policy = "disconnect"
        client.on_overflow = self.fall_behind
        if on_detach is not None:
            self._on_detach[client.id] = on_detach

    def detach(self, client: SSEClient, reason: str) -> None:
        """A stream ended (for whatever reason): make sure the client is gone."""
        self.run_viewers.pop(client.id, None)
        self.registry.close(client, reason, discard=True)
        if (on_detach := self._on_detach.pop(client.id, None)) is not None:
            on_detach()
        if self.running.pop(client.id, None) is not None and not self.running:
            self._ended.set()

    def serving(self, send: Send) -> None:
        """The server's ``send``, seen by each stream (see :class:`ServerStop`)."""
        self.server_stop.watch(send)

    def disconnected(self, client: SSEClient) -> None:
        """The browser went away."""
        self.registry.close(client, DisconnectReason.CLIENT_CLOSED, discard=True)

    def release_unstarted(self, client: SSEClient) -> None:
        """Release a client whose response will never run."""
        if not client.attached:
            self.detach(client, DisconnectReason.NEVER_STARTED)

    def sent(self, events: int, size: int, created: float = 0.0) -> None:
        """Count a write; ``created`` is its oldest event's arrival time, if known."""
        self.counters.sent(events, size, created)

    async def wait_ended(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for every stream to end; then abandon the writes
        of those still stuck on clients that stopped reading, and wait a little more."""
        self.server_stop.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._ended.wait()
        if self.running:
            for client in list(self.running.values()):
                client.mark_closed(DisconnectReason.SHUTDOWN, discard=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._ended.wait()

    async def opening(self, client: SSEClient) -> list[bytes]:
        """The first bytes of a stream; when the backend cannot answer in time, just the
        retry hint, and the stream ends so that the browser comes back later."""
        timeout = self.cluster.opening_timeout
        if timeout is None:
            return await self._opening(client)
        try:
            async with asyncio.timeout(timeout):
                return await self._opening(client)
        except Exception as exc:
            self.counters.backend_errors += 1
            logger.warning("cannot open stream %s: the backend does not answer (%s)", client.id, exc or "timed out")
            self.registry.close(client, DisconnectReason.BACKEND_UNAVAILABLE, discard=True)
            return [self.retry_hint()]

    async def _opening(self, client: SSEClient) -> list[bytes]:
        """The retry hint, then either the cursor or the replay of what the client
        missed, merged in order with anything already queued for it."""
        await self.cluster.synced()
        view = self.run_viewers.get(client.id)
        if view is not None:
            return await self._run_opening(client, *view)
        chunks = [self.retry_hint()]
        if client.positions is not None:
            return chunks + await opening_each(self.backend, self.replays, self.counters, client)
        if client.last_event_id is None:
            chunks.append(wire.cursor_frame(str(await self.backend.head())))
            return chunks
        self.counters.resumes += 1
        channels = [*client.channels, ALL_CHANNEL]
        # Only among what this client may read: resume is no oracle for other channels.
        after = await self.backend.resolve(client.last_event_id, [ALL_CHANNEL, *readable(client)])
        replay = await self.replays.replay(channels, after)
        replayed = frozenset(channels) - replay.gaps
        client.skip_replayed(replay.head, replayed)
        frames = [Frame(m.seq, m.channel, wire.frame(m.id, m.payload)) for m in replay.messages]
        queued = [f for f in client.take_frames() if not (f.seq <= replay.head and f.channel in replayed)]
        merged = sorted(frames + queued, key=lambda f: f.seq)
        last = 0
        for frame in merged:
            chunks.append(frame.data)
            last = max(last, frame.seq)
        self.counters.events_sent += len(merged)
        if replay.gaps:
            self.counters.resume_gaps += 1
            chunks.append(gap_frame(str(replay.head), replay.gaps, client.last_event_id))
        elif last < replay.head:
            chunks.append(wire.cursor_frame(str(replay.head)))
        return chunks

    def fall_behind(self, client: SSEClient, dropped: int) -> None:
        """A run viewer's buffer is full: drop it; its stream catches up from history."""
        outlet = client.outlet
        if outlet is None or client.id not in self.run_viewers:
            # Not streaming yet: it reconnects and resumes instead.
            self.registry.close(client, DisconnectReason.SLOW_CONSUMER, discard=True)
            return
        frames = client.take_frames()
        after = frames[0].seq - 1 if frames else client.position(self.run_viewers[client.id][0])
        outlet.behind = after if outlet.behind is None else min(outlet.behind, after)
        outlet.wake()

    async def catch_up(self, client: SSEClient, outlet: Outlet) -> list[bytes]:
        """What a run viewer missed since it fell behind, from the run's history, merged
        with what is queued; the run's end ends the stream after it."""
        channel = self.run_viewers[client.id][0]
        after = max(outlet.behind or 0, client.position(channel))
        outlet.behind = None
        replay = await self.replays.replay([channel], after)
        continuous = frozenset([channel]) - replay.gaps
        client.skip_replayed(replay.head, continuous)
        frames = [Frame(m.seq, m.channel, wire.frame(m.id, m.payload)) for m in replay.messages]
        queued = [f for f in client.take_frames() if not (f.seq <= replay.head and f.channel in continuous)]
        merged = sorted(frames + queued, key=lambda f: f.seq)
        if merged:
            client.taken_seq = max(client.taken_seq, merged[-1].seq)
        if any(is_run_end(m.channel, m.payload) for m in replay.messages):
            self.registry.close(client, DisconnectReason.RUN_ENDED, discard=False)
        return client.render(merged)

    async def _run_opening(self, client: SSEClient, channel: str, cursor: str | None, first: int) -> list[bytes]:
        """A run viewer's opening: the run from the cursor (from its start without one,
        or after a ``gap`` when the cursor is unknown or history no longer reaches it),
        merged with what is queued; a run that has ended ends the stream after it."""
        cursors = None if cursor is None else await _positions.cursors_of(self.backend, cursor, [channel])
        after = first if cursors is None and cursor is None else (None if cursors is None else cursors[channel])
        replay = await self.replays.replay([channel], first if after is None else max(after, first))
        continuous = frozenset([channel]) - replay.gaps
        client.skip_replayed(replay.head, continuous)
        chunks = [self.retry_hint()]
        if after is None or replay.gaps:
            self.counters.resume_gaps += 1
            # Its id resumes from where the replay starts, should the stream be cut here.
            chunks.append(gap_frame(self._id_at(client, channel, first if after is None else after), [], cursor or ""))
        frames = [Frame(m.seq, m.channel, wire.frame(m.id, m.payload)) for m in replay.messages]
        queued = [f for f in client.take_frames() if not (f.seq <= replay.head and f.channel in continuous)]
        merged = sorted(frames + queued, key=lambda f: f.seq)
        chunks.extend(client.render(merged))
        if merged:
            client.taken_seq = merged[-1].seq
        self.counters.events_sent += len(merged)
        if any(is_run_end(m.channel, m.payload) for m in replay.messages):
            self.registry.close(client, DisconnectReason.RUN_ENDED, discard=False)
        elif not merged:
            chunks.append(wire.cursor_frame(self._id_at(client, channel, replay.head)))
        return chunks

    @staticmethod
    def _id_at(client: SSEClient, channel: str, seq: int) -> str:
        """The id that puts a stream at ``seq`` on ``channel``."""
        positions = client.positions
        if positions is None:
            return str(seq)
        positions.advance(channel, seq)
        return positions.text()
