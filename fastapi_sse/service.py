"""The SSE service: clients, channels, publishing, fan-out, limits, stats and lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
import random
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from datetime import UTC, datetime
from types import FrameType
from typing import Any, TypeVar

from fastapi_sse import middleware, wire
from fastapi_sse.backends.base import Backend, Message, Publication
from fastapi_sse.backends.memory import MemoryBackend
from fastapi_sse.client import DisconnectReason, Frame, SSEClient
from fastapi_sse.errors import (
    BackendError,
    BadRequestError,
    InvalidChannelError,
    InvalidEventError,
    LimitExceededError,
    ServiceNotRunningError,
)
from fastapi_sse.publishing import Publisher
from fastapi_sse.replays import SharedReplays
from fastapi_sse.response import RefusedStream, SSEResponse
from fastapi_sse.settings import SSESettings, load_settings
from fastapi_sse.stats import ConnectionStats, Counters
from fastapi_sse.writer import Writer

logger = logging.getLogger("fastapi_sse")

ALL_CHANNEL = "$all"
"""Internal channel every client listens to; :meth:`SSEService.broadcast_all` uses it."""
CLIENT_CHANNEL_PREFIX = "$client:"
"""Internal per-client channel; :meth:`SSEService.send_to` uses it."""
IDENTITY_CHANNEL_PREFIX = "$identity:"
"""Pseudo channel of an identity: the id of an event sent to one of its clients
resolves through it when a client of that identity resumes (nothing is published on it)."""

GAP_EVENT = "gap"
"""Name of the event a resuming client gets when history no longer covers its cursor."""

_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_DRAIN_STEP = 0.05
"""Seconds between two waves of a drain, at the least."""

_T = TypeVar("_T")

# Sent on a client's channel to make the worker holding it close it (a real event's
# payload is never empty).
_CLOSE = b""

EventSpec = tuple[str, str, Any] | tuple[str, str, Any, str | None]
"""One event of :meth:`SSEService.publish_many`: ``(channel, event, data[, id])``."""

_REMOTE_CLIENT_ID = re.compile(r"[0-9a-f]{12}\.[0-9a-f]{32}")


def _readable(client: SSEClient) -> tuple[str, ...]:
    """A client's channels and its identity's pseudo channel (ids resolve through them)."""
    if client.identity is None:
        return tuple(client.channels)
    return (*client.channels, IDENTITY_CHANNEL_PREFIX + client.identity)


def _client_channel(client_id: str) -> str:
    return CLIENT_CHANNEL_PREFIX + client_id


class SSEService:
    """Server-Sent Events for one application: clients, channels, broadcasting.

    Build it with :class:`SSESettings` (read from ``SSE_*`` variables when omitted),
    start it with ``async with`` (or let :func:`create_sse_router`'s lifespan do it),
    and reach it in handlers through ``Depends(get_sse)``.

    Every publishing method (:meth:`broadcast`, :meth:`broadcast_all`,
    :meth:`send_to`) works without ``await`` from async handlers, sync handlers,
    background tasks and other threads; the data is validated and encoded in the
    caller's thread, so a bad event raises right there. The ``publish*`` coroutines
    do the same and return once the backend has accepted (and stored) the event.
    """

    def __init__(self, settings: SSESettings | None = None, *, backend: Backend | None = None) -> None:
        self.settings = settings if settings is not None else load_settings()
        self.backend = backend if backend is not None else _make_backend(self.settings)
        self.worker_id = uuid.uuid4().hex[:12]
        self._channel_re = re.compile(self.settings.channel_pattern)
        self._clients: dict[str, SSEClient] = {}
        self._channels: dict[str, dict[str, SSEClient]] = {}
        self._identities: dict[str, dict[str, SSEClient]] = {}
        self._counters = Counters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._running = False
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        # Streams that started and have not ended yet, for aclose() to wait on.
        self._streams: dict[str, SSEClient] = {}
        self._streams_done = asyncio.Event()
        self._streams_done.set()
        # A shared backend's history is read once for the streams that resume together.
        self._replays: Backend | SharedReplays = SharedReplays(self.backend) if self.backend.remote else self.backend
        self._publisher = Publisher(
            self.backend,
            self._counters,
            outbox_bytes=self.settings.publish_buffer_bytes,
            outbox_events=self.settings.publish_buffer_size,
            turn_bytes=self.settings.max_buffer_bytes // 4,
            writer_busy=lambda: self._writer.busy,
            writer_settled=lambda: self._writer.settled(),
        )
        self._interest_pending: dict[str, bool] = {}
        self._interest_synced = asyncio.Condition()
        self._interest_generation = 0
        self._interest_done = 0
        self._interest_wake = asyncio.Event()
        self._previous_handlers: dict[int, Any] = {}
        # Clients whose identity holds a slot in the shared backend (claimed once).
        self._claimed: set[str] = set()
        self._announced = False
        self._writer = Writer(self._sent)

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Connect the backend and start the heartbeat; called by the lifespan."""
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._publisher.start(self._loop)
        self.backend.lost = self._lost
        self.backend.settle = self._writer.settled
        await self.backend.start(self._deliver)
        self._running = True
        self._closing = False
        self._spawn(self._heartbeat())
        self._spawn(self._writer.run())
        if self.backend.remote:
            self._spawn(self._publisher.drain())
            self._spawn(self._sync_interest())
            # Registered before the first request: shared limits count only live workers.
            try:
                await self._announce()
            except Exception as exc:
                self._counters.backend_errors += 1
                logger.warning("could not register this worker: %s", exc)
            self._spawn(self._presence())

    async def aclose(self, grace: float = 5.0) -> None:
        """End every stream, wait up to ``grace`` seconds for them, stop the backend."""
        if not self._running:
            return
        self.shutdown()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._streams_done.wait()
        # Streams still writing after the grace period are stuck on clients that
        # stopped reading: abandon their writes.
        if self._streams:
            for client in list(self._streams.values()):
                client.mark_closed(DisconnectReason.SHUTDOWN, discard=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._streams_done.wait()
        await self._publisher.flush(grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            done, stuck = await asyncio.wait(list(self._tasks), timeout=grace)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved: what failed was logged where it failed
            if stuck:
                logger.error("%d background task(s) did not stop at shutdown", len(stuck))
        if self.backend.remote:
            with contextlib.suppress(Exception):
                await self.backend.withdraw(self.worker_id)
        await self.backend.close()
        self._running = False
        self.restore_signal_handlers()

    @property
    def running(self) -> bool:
        """Whether the service is started and not yet closed."""
        return self._running

    async def __aenter__(self) -> SSEService:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def shutdown(self) -> None:
        """Close every connection: each stream sends what it has buffered, then ends.

        New connections are refused from now on. Browsers reconnect after the retry
        interval (to another worker, or to this one once it is back) and replay.
        """
        if (loop := self._other_threads_loop()) is not None:
            return _run_in(loop, self.shutdown)
        self._closing = True
        for client in list(self._clients.values()):
            self._close(client, DisconnectReason.SHUTDOWN, discard=False)

    def drain(self) -> None:
        """Like :meth:`shutdown`, but end the streams in waves over ``drain_window``
        seconds, so that their reconnects reach the other workers at an even rate.
        New connections are refused (told to come back later) from now on."""
        if (loop := self._other_threads_loop()) is not None:
            return _run_in(loop, self.drain)
        window = self.settings.drain_window
        if window <= 0 or not self._clients:
            return self.shutdown()
        self._closing = True
        self._spawn(self._drain(list(self._clients.values()), window))

    async def _drain(self, clients: list[SSEClient], window: float) -> None:
        waves = max(1, min(len(clients), round(window / _DRAIN_STEP)))
        size = math.ceil(len(clients) / waves)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for wave in range(waves):
            # Paced from the start, so that a slow wave does not stretch the window.
            await asyncio.sleep(max(0.0, start + wave * window / waves - loop.time()))
            for client in clients[wave * size : (wave + 1) * size]:
                self._close(client, DisconnectReason.SHUTDOWN, discard=False)

    def install_signal_handlers(self) -> None:
        """Start the drain (:meth:`drain`) as soon as SIGINT or SIGTERM arrives, then let
        the server's own handler run. Without this, uvicorn waits for open streams
        before it runs the app's shutdown. Does nothing outside the main thread."""
        if threading.current_thread() is not threading.main_thread() or self._previous_handlers:
            return
        loop = self._loop
        for sig in _SIGNALS:
            previous = signal.getsignal(sig)

            def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
                if loop is not None and not loop.is_closed():
                    loop.call_soon_threadsafe(self.drain)
                if callable(previous):
                    previous(signum, frame)
                elif previous == signal.default_int_handler:  # pragma: no cover
                    raise KeyboardInterrupt

            self._previous_handlers[sig] = previous
            signal.signal(sig, handler)

    def restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous)
        self._previous_handlers.clear()

    # -- clients --------------------------------------------------------------------

    def add_client(
        self, last_event_id: str | None = None, *, identity: str | None = None
    ) -> tuple[SSEClient, SSEResponse]:
        """Create a client and the response that streams to it; return the response
        from the handler.

        The stream replays what the client missed on every channel it is subscribed to
        before the response starts, from ``last_event_id``: by default the request's
        own ``Last-Event-ID`` header (what EventSource sends on every reconnect), or
        its ``last_event_id`` query parameter for a first connection. Pass ``""`` to
        start fresh. ``identity`` (e.g. the user id) applies
        ``max_connections_per_identity``, across every worker with a shared backend.
        When load, a limit or shutdown refuses the stream, the client comes back
        already closed (``close_reason == "refused"``) with a response that tells the
        browser when to come back; return it as usual (with ``hard_refusals`` this
        raises :class:`LimitExceededError`, an ``HTTPException``, instead). A malformed
        ``last_event_id`` raises :class:`BadRequestError`. If the handler ends without
        returning the response (it raised its own 400 or 403, or returned something
        else), the client is released when the request ends.
        """
        if (loop := self._other_threads_loop()) is not None:
            return _run_in(loop, lambda: self.add_client(last_event_id, identity=identity))
        self._require_running()
        settings = self.settings
        if last_event_id is None:
            last_event_id = middleware.current_last_event_id()
        if self._closing:
            return self._refuse(
                LimitExceededError(
                    "shutdown", "the server is shutting down", 503, retry_after=math.ceil(settings.retry_interval)
                )
            )
        if last_event_id is not None:
            try:
                wire.check_last_event_id(last_event_id, settings.max_last_event_id_length)
            except ValueError as exc:
                raise BadRequestError(str(exc)) from None
            last_event_id = last_event_id or None
        if len(self._clients) >= settings.max_connections:
            return self._refuse(
                LimitExceededError(
                    "max_connections",
                    f"too many open streams (max_connections={settings.max_connections})",
                    503,
                    retry_after=math.ceil(settings.retry_interval),
                )
            )
        # With a shared backend the limit holds across workers: enforce_identity_limit.
        if identity is not None and not self.backend.remote:
            existing = self._identities.get(identity)
            if existing is not None and len(existing) >= settings.max_connections_per_identity:
                if settings.identity_limit_policy == "refuse":
                    return self._refuse(self.identity_refusal())
                while len(existing) >= settings.max_connections_per_identity:
                    oldest = next(iter(existing.values()))
                    self._close(oldest, DisconnectReason.REPLACED, discard=False)
        client = SSEClient(
            f"{self.worker_id}.{uuid.uuid4().hex}",
            created_at=datetime.now(UTC),
            last_event_id=last_event_id,
            identity=identity,
            buffer_limit=settings.max_buffer_bytes,
            policy=settings.overflow_policy,
        )
        client.on_overflow = self._on_overflow
        self._clients[client.id] = client
        if identity is not None:
            self._identities.setdefault(identity, {})[client.id] = client
        self._join(client, ALL_CHANNEL)
        self._join(client, _client_channel(client.id))
        self._counters.connects += 1
        middleware.opened(client, self.remove_unstarted)
        return client, SSEResponse(client, self)

    def identity_refusal(self) -> LimitExceededError:
        """The error for a stream past ``max_connections_per_identity`` (``refuse``)."""
        limit = self.settings.max_connections_per_identity
        return LimitExceededError(
            "max_connections_per_identity",
            f"too many open streams for this user (max_connections_per_identity={limit})",
            429,
        )

    def _refuse(self, error: LimitExceededError) -> tuple[SSEClient, SSEResponse]:
        """Refuse a new stream for load, a limit or shutdown: by default with a stream that
        says when to come back (``retry:``) and ends, so that a browser's EventSource
        reconnects later; with ``hard_refusals``, with the HTTP error, which makes it stop."""
        self._counters.refused[error.limit] += 1
        if self.settings.hard_refusals:
            raise error
        client = SSEClient(
            f"{self.worker_id}.{uuid.uuid4().hex}",
            created_at=datetime.now(UTC),
            last_event_id=None,
            identity=None,
            buffer_limit=self.settings.max_buffer_bytes,
            policy=self.settings.overflow_policy,
        )
        client.mark_closed(DisconnectReason.REFUSED, discard=True)
        return client, RefusedStream(client, self, error)

    def retry_hint(self) -> bytes:
        """A ``retry:`` frame with this stream's own delay: ``retry_interval`` spread by
        ``retry_jitter``, so that streams ended together do not come back together."""
        jitter = self.settings.retry_jitter
        base = self.settings.retry_interval
        return wire.retry_frame(base * (1 + jitter * (2 * random.random() - 1)) if jitter else base)

    def remove_client(self, client_id: str) -> bool:
        """Disconnect a client: its stream sends what is buffered, then ends."""
        if (loop := self._other_threads_loop()) is not None:
            return _run_in(loop, lambda: self.remove_client(client_id))
        client = self._clients.get(client_id)
        if client is None:
            return False
        self._close(client, DisconnectReason.REMOVED, discard=False)
        return True

    def get_client(self, client_id: str) -> SSEClient | None:
        """The connected client with this id, or None."""
        return self._clients.get(client_id)

    async def enforce_identity_limit(self, client: SSEClient) -> None:
        """Apply ``max_connections_per_identity`` across every worker sharing the backend.

        The response does it before it starts; call it yourself only to know the
        answer earlier in the handler (it counts once per client). With ``refuse`` it
        removes the client and raises :class:`LimitExceededError` (429) when the
        identity is at its limit; with ``remove_oldest`` it closes the identity's
        oldest streams, on whichever worker they are. In-process backends need nothing
        more than ``add_client`` did. While the backend is unreachable the connection
        is allowed (and logged).
        """
        if client.identity is None or not self.backend.remote or client.closed or client.id in self._claimed:
            return
        self._claimed.add(client.id)
        settings = self.settings
        refuse = settings.identity_limit_policy == "refuse"
        try:
            evicted = await self.backend.claim(
                "identity:" + client.identity, client.id, settings.max_connections_per_identity, evict=not refuse
            )
        except Exception as exc:
            self._counters.backend_errors += 1
            logger.warning("could not check the connection limit of an identity (%s); allowing the stream", exc)
            return
        if client.closed:
            # Closed while the claim was on its way: give back what it may have taken.
            await self._release(client)
            return
        if evicted is None:
            self._counters.refused["max_connections_per_identity"] += 1
            self._close(client, DisconnectReason.REMOVED, discard=True)
            raise self.identity_refusal()
        for victim in evicted:
            local = self._clients.get(victim)
            if local is not None:
                self._close(local, DisconnectReason.REPLACED, discard=False)
                continue
            try:
                # An empty message on a client's channel tells its worker to close it.
                await self.backend.publish(_client_channel(victim), _CLOSE, None, store=False)
            except Exception as exc:
                self._counters.backend_errors += 1
                logger.warning("could not ask another worker to close stream %s: %s", victim, exc)

    def get_clients(self) -> list[SSEClient]:
        """Every client connected to this process (this worker's view, not the
        cluster's), oldest first."""
        return list(self._clients.values())

    def get_clients_by_channel(self, channel: str) -> list[SSEClient]:
        """Clients of this process subscribed to ``channel`` (this worker's view, not
        the cluster's), oldest subscription first."""
        members = self._channels.get(channel)
        return list(members.values()) if members else []

    def subscribe(self, client_id: str, channel: str) -> bool:
        """Subscribe a client to a channel; False when there is no such client.

        Raises :class:`InvalidChannelError` for a malformed name and
        :class:`LimitExceededError` past ``max_channels_per_connection``.
        """
        if (loop := self._other_threads_loop()) is not None:
            return _run_in(loop, lambda: self.subscribe(client_id, channel))
        self.check_channel(channel)
        client = self._clients.get(client_id)
        if client is None:
            return False
        if channel in client.channels:
            return True
        limit = self.settings.max_channels_per_connection
        if len(client.channels) >= limit:
            raise LimitExceededError(
                "max_channels_per_connection",
                f"a stream may subscribe to at most {limit} channels (max_channels_per_connection)",
                400,
            )
        client.channels.add(channel)
        self._join(client, channel)
        return True

    def unsubscribe(self, client_id: str, channel: str) -> bool:
        """Unsubscribe a client from a channel; False when it was not subscribed."""
        if (loop := self._other_threads_loop()) is not None:
            return _run_in(loop, lambda: self.unsubscribe(client_id, channel))
        client = self._clients.get(client_id)
        if client is None or channel not in client.channels:
            return False
        client.channels.discard(channel)
        self._leave(client, channel)
        return True

    # -- publishing -----------------------------------------------------------------

    def broadcast(self, channel: str, event: str, data: Any, id: str | None = None) -> None:
        """Send an event to every subscriber of ``channel``, on every worker."""
        self.check_channel(channel)
        self._publish_nowait(channel, self._encode(event, data, id), id, store=True)

    def broadcast_all(self, event: str, data: Any, id: str | None = None) -> None:
        """Send an event to every connected client."""
        self._publish_nowait(ALL_CHANNEL, self._encode(event, data, id), id, store=True)

    def send_to(self, client_id: str, event: str, data: Any, id: str | None = None) -> bool:
        """Send an event to one client; False when there is no such client.

        With a shared backend a client of another worker counts: the event goes to
        the worker named in the client id, which drops it if the client is gone.
        """
        payload = self._encode(event, data, id)
        if not self._reachable(client_id):
            return False
        self._publish_nowait(_client_channel(client_id), payload, id, store=False, index=self._readers(client_id, id))
        return True

    async def publish(self, channel: str, event: str, data: Any, id: str | None = None) -> str:
        """Like :meth:`broadcast`, but return the event's id once the backend has
        stored and announced it; raises :class:`BackendError` when it cannot."""
        self.check_channel(channel)
        return await self._publish(channel, self._encode(event, data, id), id, store=True)

    async def publish_many(self, events: Iterable[EventSpec]) -> list[str]:
        """Publish several events, in order, and return their ids once the backend has
        stored and announced them all: one round trip to a remote backend.

        Each event is a tuple ``(channel, event, data)`` or ``(channel, event, data, id)``,
        as the arguments of :meth:`publish`. Every event is validated and encoded first,
        so a bad one raises (:class:`InvalidChannelError`, :class:`InvalidEventError`)
        before any is sent. Raises :class:`BackendError` when the backend cannot take
        them; then the first events of the batch may have been published.
        """
        publications = []
        for spec in events:
            channel, event, data, *rest = spec
            event_id = rest[0] if rest else None
            self.check_channel(channel)
            publications.append(Publication(channel, self._encode(event, data, event_id), event_id, True))
        self._require_running()
        return [message.id for message in await self._publisher.publish_many(publications)]

    async def publish_all(self, event: str, data: Any, id: str | None = None) -> str:
        """Like :meth:`broadcast_all`, awaited; returns the event's id."""
        return await self._publish(ALL_CHANNEL, self._encode(event, data, id), id, store=True)

    async def publish_to(self, client_id: str, event: str, data: Any, id: str | None = None) -> str | None:
        """Like :meth:`send_to`, awaited; returns the event's id, or None for an unknown client."""
        payload = self._encode(event, data, id)
        if not self._reachable(client_id):
            return None
        return await self._publish(
            _client_channel(client_id), payload, id, store=False, index=self._readers(client_id, id)
        )

    def _readers(self, client_id: str, event_id: str | None) -> tuple[str, ...]:
        """Where the id of an event for one client resolves once that client resumes as
        a new client: the channels it reads now, and its identity's pseudo channel. A
        client of another worker is unknown here: its resume from such an id is a gap."""
        client = self._clients.get(client_id)
        if event_id is None or client is None:
            return ()
        return _readable(client)

    def _reachable(self, client_id: str) -> bool:
        """Whether a client id is this worker's client or, with a shared backend,
        another worker's (``<worker_id>.<32 hex digits>``)."""
        if client_id in self._clients:
            return True
        return self.backend.remote and _REMOTE_CLIENT_ID.fullmatch(client_id) is not None

    def check_channel(self, channel: str) -> str:
        """Raise :class:`InvalidChannelError` unless ``channel`` is a valid name."""
        settings = self.settings
        if not isinstance(channel, str) or not channel:
            raise InvalidChannelError(f"channel must be a non-empty string, got {channel!r}")
        if len(channel) > settings.max_channel_length:
            raise InvalidChannelError(
                f"channel name is {len(channel)} characters, more than max_channel_length={settings.max_channel_length}"
            )
        if not self._channel_re.fullmatch(channel):
            raise InvalidChannelError(
                f"channel {channel!r} does not match the allowed pattern {settings.channel_pattern!r}"
            )
        return channel

    # -- stats ------------------------------------------------------------------------

    def stats(self) -> ConnectionStats:
        """Connection statistics of this process (the admin connections view, and more);
        :meth:`cluster_stats` adds up every worker sharing the backend."""
        clients = self._clients.values()
        by_channel: Counter[str] = Counter()
        for client in clients:
            by_channel.update(client.channels)
        counters = self._counters
        return ConnectionStats(
            scope="worker",
            worker_id=self.worker_id,
            backend=self.settings.backend,
            total_connections=len(self._clients),
            by_channel=dict(by_channel),
            oldest_connection=min((c.created_at for c in clients), default=None),
            connects=counters.connects,
            disconnects=dict(counters.disconnects),
            refused=dict(counters.refused),
            events_published=counters.published,
            events_sent=counters.events_sent,
            bytes_sent=counters.bytes_sent,
            events_dropped=counters.dropped,
            slow_consumer_disconnects=counters.disconnects.get(DisconnectReason.SLOW_CONSUMER, 0),
            resumes=counters.resumes,
            resume_gaps=counters.resume_gaps,
            publish_failures=counters.publish_failures,
            pending_publishes=self._publisher.pending,
        )

    async def cluster_stats(self) -> ConnectionStats:
        """Statistics of every worker sharing the backend; this worker's alone when
        the backend is in-process (then ``scope`` is ``worker``).

        Each worker registers its stats in the backend every ``presence_interval``
        seconds; a worker silent for three intervals (stopped, killed) drops out.
        Raises :class:`BackendError` when the backend cannot be read.
        """
        mine = self.stats()
        if not self.backend.remote:
            return mine
        try:
            peers = await self.backend.peers()
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"could not read the other workers' stats: {exc}") from exc
        others = [
            ConnectionStats.model_validate_json(info) for worker, info in peers.items() if worker != self.worker_id
        ]
        return _sum_stats(mine, others)

    async def _announce(self) -> None:
        ttl = self.settings.presence_interval * 3
        known = await self.backend.announce(self.worker_id, self.stats().model_dump_json().encode(), ttl)
        if known is False and self._announced:
            # The store lost this worker's registration, and with it the identity slots
            # of its streams: put them back, or the limits would forget open streams.
            logger.warning("the shared backend lost this worker's registration; restoring its identity slots")
            groups: dict[str, list[str]] = {}
            for client_id in self._claimed:
                client = self._clients.get(client_id)
                if client is not None and client.identity is not None:
                    groups.setdefault("identity:" + client.identity, []).append(client_id)
            for members in groups.values():
                members.sort(key=lambda cid: self._clients[cid].created_at)
            await self.backend.reclaim(groups)
        self._announced = True

    async def _presence(self) -> None:
        """Keep this worker's registration (and stats) fresh in the shared backend."""
        task = asyncio.current_task()
        while not self._closing:
            await asyncio.sleep(self.settings.presence_interval)
            try:
                await self._announce()
            except Exception as exc:
                self._counters.backend_errors += 1
                logger.warning("could not refresh this worker's registration: %s", exc)
            # The Redis client can absorb a cancellation that lands mid-command.
            if task is not None and task.cancelling():
                return

    # -- internals: registry --------------------------------------------------------

    def _join(self, client: SSEClient, channel: str) -> None:
        members = self._channels.get(channel)
        if members is None:
            members = self._channels[channel] = {}
            self._interest(channel, True)
        members[client.id] = client

    def _leave(self, client: SSEClient, channel: str) -> None:
        members = self._channels.get(channel)
        if members is None:
            return
        members.pop(client.id, None)
        if not members:
            del self._channels[channel]
            self._interest(channel, False)

    def _close(self, client: SSEClient, reason: str, *, discard: bool) -> None:
        """Remove a client from every registry and tell its stream to end."""
        if self._clients.pop(client.id, None) is None:
            return
        for channel in client.channels:
            self._leave(client, channel)
        self._leave(client, ALL_CHANNEL)
        self._leave(client, _client_channel(client.id))
        if client.identity is not None:
            mine = self._identities.get(client.identity)
            if mine is not None:
                mine.pop(client.id, None)
                if not mine:
                    del self._identities[client.identity]
        if client.id in self._claimed:
            self._claimed.discard(client.id)
            self._spawn(self._release(client))
        self._counters.disconnects[reason] += 1
        client.mark_closed(reason, discard=discard)

    def _on_overflow(self, client: SSEClient, dropped: int) -> None:
        if dropped:
            self._counters.dropped += dropped
            logger.warning(
                "client %s is reading too slowly: dropped %d event(s) (overflow_policy=%s)",
                client.id,
                dropped,
                self.settings.overflow_policy,
            )
            return
        logger.warning(
            "client %s is reading too slowly: disconnected after %d buffered bytes; it will reconnect and replay",
            client.id,
            client.buffered_bytes,
        )
        self._close(client, DisconnectReason.SLOW_CONSUMER, discard=True)

    def _interest(self, channel: str, listen: bool) -> None:
        if self.backend.remote:
            self._interest_pending[channel] = listen
            self._interest_generation += 1
            self._interest_wake.set()

    async def _sync_interest(self) -> None:
        """Tell a remote backend which channels this process needs, in batches."""
        while True:
            await self._interest_wake.wait()
            self._interest_wake.clear()
            pending, self._interest_pending = self._interest_pending, {}
            generation = self._interest_generation
            listen = [c for c, on in pending.items() if on]
            unlisten = [c for c, on in pending.items() if not on and c not in self._channels]
            try:
                if unlisten:
                    await self.backend.unlisten(unlisten)
                if listen:
                    await self.backend.listen(listen)
            except Exception:
                self._counters.backend_errors += 1
                logger.exception("could not update the backend's channel subscriptions; retrying")
                for channel in listen:
                    self._interest_pending.setdefault(channel, True)
                self._interest_wake.set()
                await asyncio.sleep(0.5)
                continue
            async with self._interest_synced:
                self._interest_done = generation
                self._interest_synced.notify_all()

    async def _wait_interest(self) -> None:
        """Return once the backend delivers every channel joined so far."""
        if not self.backend.remote:
            return
        target = self._interest_generation
        async with self._interest_synced:
            await self._interest_synced.wait_for(lambda: self._interest_done >= target)

    # -- internals: publishing ------------------------------------------------------

    def _encode(self, event: str, data: Any, event_id: str | None) -> bytes:
        name = wire.check_event_name(event)
        if event_id is not None:
            wire.check_event_id(event_id, self.settings.max_last_event_id_length)
        payload = wire.frame_payload(name, wire.encode_data(data))
        if len(payload) > self.settings.max_event_bytes:
            raise InvalidEventError(
                f"event {event!r} is {len(payload)} bytes encoded, more than max_event_bytes="
                f"{self.settings.max_event_bytes}; send an id and let the client fetch the rest"
            )
        return payload

    def _other_threads_loop(self) -> asyncio.AbstractEventLoop | None:
        """The service's running loop when called from another thread (a sync handler,
        a job), else None. The registries and the streams' futures belong to that loop,
        so the methods that change them run there."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread or not loop.is_running():
            return None
        return loop

    def _publish_nowait(
        self, channel: str, payload: bytes, event_id: str | None, *, store: bool, index: Collection[str] = ()
    ) -> None:
        self._require_running()
        self._publisher.publish_nowait(channel, payload, event_id, store=store, index=index)

    async def _publish(
        self, channel: str, payload: bytes, event_id: str | None, *, store: bool, index: Collection[str] = ()
    ) -> str:
        self._require_running()
        return await self._publisher.publish(channel, payload, event_id, store=store, index=index)

    def _require_running(self) -> asyncio.AbstractEventLoop:
        if not self._running or self._loop is None:
            raise ServiceNotRunningError(
                "the SSE service is not running: include the router from create_sse_router(...) "
                "in your app, use lifespan=sse_lifespan(), or start it with 'async with SSEService(...)'"
            )
        return self._loop

    async def _release(self, client: SSEClient) -> None:
        try:
            await self.backend.release("identity:" + str(client.identity), client.id)
        except Exception as exc:
            self._counters.backend_errors += 1
            logger.warning("could not release the identity slot of stream %s: %s", client.id, exc)

    def _lost(self, channels: Collection[str]) -> None:
        """The backend could not deliver what these channels missed: close their
        clients so that they resume, and get the ``gap`` event if history lost it."""
        doomed: dict[str, SSEClient] = {}
        for channel in channels:
            doomed.update(self._channels.get(channel, {}))
        for client in doomed.values():
            self._close(client, DisconnectReason.BACKEND_GAP, discard=False)

    def _deliver(self, message: Message) -> None:
        """Fan one message out to this process's subscribers, framed once."""
        members = self._channels.get(message.channel)
        if not members:
            return
        if message.payload == _CLOSE and message.channel.startswith(CLIENT_CHANNEL_PREFIX):
            for client in list(members.values()):
                self._close(client, DisconnectReason.REPLACED, discard=False)
            return
        frame = Frame(message.seq, message.channel, wire.frame(message.id, message.payload), time.monotonic())
        for client in list(members.values()):
            client.push(frame)

    # -- internals: streams -----------------------------------------------------------

    def _attach(self, client: SSEClient) -> bool:
        """Mark a client's stream as started; False when it was closed before."""
        if client.closed:
            return False
        client.attached = True
        self._streams[client.id] = client
        self._streams_done.clear()
        return True

    async def _opening(self, client: SSEClient) -> list[bytes]:
        """The first bytes of a stream; when a remote backend cannot answer, just the
        retry hint, and the stream ends so that the browser comes back later."""
        if not self.backend.remote:
            return await self._opening_chunks(client)
        try:
            async with asyncio.timeout(self.settings.redis_timeout * 2):
                return await self._opening_chunks(client)
        except Exception as exc:
            self._counters.backend_errors += 1
            logger.warning("cannot open stream %s: the backend does not answer (%s)", client.id, exc or "timed out")
            self._close(client, DisconnectReason.BACKEND_UNAVAILABLE, discard=True)
            return [self.retry_hint()]

    async def _opening_chunks(self, client: SSEClient) -> list[bytes]:
        """The first bytes of a stream: the retry hint, then either the cursor or the
        replay of what the client missed, merged in order with anything already
        queued for it."""
        await self._wait_interest()
        chunks = [self.retry_hint()]
        if client.last_event_id is None:
            head = await self.backend.head()
            chunks.append(wire.cursor_frame(str(head)))
            return chunks
        self._counters.resumes += 1
        channels = [*client.channels, ALL_CHANNEL]
        # Only among what this client may read: resume is no oracle for other channels.
        after = await self.backend.resolve(client.last_event_id, [ALL_CHANNEL, *_readable(client)])
        replay = await self._replays.replay(channels, after)
        replayed = frozenset(channels) - replay.gaps
        client._floor = replay.head
        client._replayed = replayed
        frames = [Frame(m.seq, m.channel, wire.frame(m.id, m.payload)) for m in replay.messages]
        queued = [f for f in client.take_frames() if not (f.seq <= replay.head and f.channel in replayed)]
        merged = sorted(frames + queued, key=lambda f: f.seq)
        last = 0
        for frame in merged:
            chunks.append(frame.data)
            last = max(last, frame.seq)
        self._counters.events_sent += len(merged)
        if replay.gaps:
            self._counters.resume_gaps += 1
            lost = sorted(c for c in replay.gaps if not c.startswith("$"))
            chunks.append(
                wire.frame(
                    str(replay.head),
                    wire.frame_payload(
                        GAP_EVENT.encode(),
                        wire.encode_data(
                            {
                                "channels": lost,
                                "all": ALL_CHANNEL in replay.gaps,
                                "last_event_id": client.last_event_id,
                            }
                        ),
                    ),
                )
            )
        elif last < replay.head:
            chunks.append(wire.cursor_frame(str(replay.head)))
        return chunks

    def remove_unstarted(self, client: SSEClient) -> None:
        """Release a client whose response will never run (the handler gives up on it)
        now; the end of its request does it otherwise."""
        if not client.attached:
            self._detach(client, DisconnectReason.NEVER_STARTED)

    def _detach(self, client: SSEClient, reason: str) -> None:
        """A stream ended (for whatever reason): make sure the client is gone."""
        self._close(client, reason, discard=True)
        if self._streams.pop(client.id, None) is not None and not self._streams:
            self._streams_done.set()

    def _sent(self, events: int, size: int, created: float = 0.0) -> None:
        """Count a write; ``created`` is its oldest event's arrival time, if known."""
        counters = self._counters
        counters.events_sent += events
        counters.bytes_sent += size
        if created:
            counters.observe_latency(time.monotonic() - created)

    # -- internals: background ------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _heartbeat(self) -> None:
        """One task for all clients: ping streams that have been idle, and remove
        clients whose response never started."""
        interval = self.settings.heartbeat_interval
        loop = asyncio.get_running_loop()
        ping = Frame(0, "", wire.PING)
        while True:
            await asyncio.sleep(interval / 4)
            now = loop.time()
            idle_since = now - interval * 0.75
            never_started = datetime.now(UTC).timestamp() - self.settings.attach_timeout
            stuck_since = now - self.settings.send_timeout
            for client in list(self._clients.values()):
                if client.attached:
                    if client.sending:
                        if client.last_write <= stuck_since:
                            logger.warning(
                                "client %s is reading too slowly: a write has been blocked for more than "
                                "send_timeout=%ss; disconnected, it will reconnect and replay",
                                client.id,
                                self.settings.send_timeout,
                            )
                            self._close(client, DisconnectReason.SLOW_CONSUMER, discard=True)
                    elif client.last_write <= idle_since and not client.buffered_bytes:
                        client.push(ping)
                elif client.created_at.timestamp() < never_started:
                    self._close(client, DisconnectReason.NEVER_STARTED, discard=True)
            self.backend.expire()


def _sum_stats(mine: ConnectionStats, others: list[ConnectionStats]) -> ConnectionStats:
    """Cluster totals: this worker's stats plus the other live workers'."""
    total = mine.model_copy(update={"scope": "cluster"})
    by_channel: Counter[str] = Counter(mine.by_channel)
    disconnects: Counter[str] = Counter(mine.disconnects)
    refused: Counter[str] = Counter(mine.refused)
    for other in others:
        by_channel.update(other.by_channel)
        disconnects.update(other.disconnects)
        refused.update(other.refused)
        for name, value in other:
            if isinstance(value, int) and name != "workers":
                setattr(total, name, getattr(total, name) + value)
        if other.oldest_connection is not None and (
            total.oldest_connection is None or other.oldest_connection < total.oldest_connection
        ):
            total.oldest_connection = other.oldest_connection
    total.by_channel, total.disconnects, total.refused = dict(by_channel), dict(disconnects), dict(refused)
    total.workers = 1 + len(others)
    return total


def _run_in(loop: asyncio.AbstractEventLoop, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on ``loop`` from another thread and return (or raise) its result."""

    async def call() -> _T:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), loop).result()


def _make_backend(settings: SSESettings) -> Backend:
    if settings.backend == "memory":
        return MemoryBackend(history_size=settings.history_size, history_ttl=settings.history_ttl)
    if settings.backend == "redis":
        # Imported here: redis-py is an optional extra.
        redis_module = importlib.import_module("fastapi_sse.backends.redis")
        backend: Backend = redis_module.RedisBackend.from_settings(settings)
        return backend
    raise ValueError(f"unknown backend {settings.backend!r}")  # pragma: no cover


__all__ = ["ALL_CHANNEL", "GAP_EVENT", "SSEService"]
