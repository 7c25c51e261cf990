"""The SSE service: the API an app uses, a facade over the parts that do the work
(``_registry``, ``_admission``, ``_cluster``, ``_streams``, ``_publishing``,
``_delivery``; ARCHITECTURE.md draws them). Each method hands over to one part."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from operator import attrgetter
from typing import Any

from fastapi_sse import middleware
from fastapi_sse._admission import Admission
from fastapi_sse._cluster import make_cluster
from fastapi_sse._counters import Counters, snapshot
from fastapi_sse._delivery import Fanout
from fastapi_sse._names import ALL_CHANNEL, GAP_EVENT, new_worker_id
from fastapi_sse._presence import Presence, make_presence
from fastapi_sse._publishing import Publisher
from fastapi_sse._registry import Registry
from fastapi_sse._runs import Runs
from fastapi_sse._signals import SignalHandlers, end_in_waves
from fastapi_sse._streams import Streams
from fastapi_sse._sweep import sweep
from fastapi_sse._tasks import Tasks
from fastapi_sse._threads import LoopThread, on_loop
from fastapi_sse._writer import Writer
from fastapi_sse.backends import MemoryRunLedger, backend_for
from fastapi_sse.backends.base import Backend, Publication
from fastapi_sse.client import DisconnectReason, SSEClient
from fastapi_sse.errors import ServiceNotRunningError
from fastapi_sse.response import SSEResponse
from fastapi_sse.settings import SSESettings, load_settings
from fastapi_sse.stats import ConnectionStats
from fastapi_sse.typed import EventTypes

logger = logging.getLogger("fastapi_sse")

EventSpec = tuple[str, str, Any] | tuple[str, str, Any, str | None]
"""One event of :meth:`SSEService.publish_many`: ``(channel, event, data[, id])``."""


_hop = on_loop(attrgetter("_threads"))
"""Methods that run on the service's loop, called from any thread."""


class SSEService:
    """Server-Sent Events for one application: clients, channels, broadcasting.

    Build it with :class:`SSESettings` (read from ``SSE_*`` variables when omitted),
    start it with ``async with`` (or let :func:`create_sse_router`'s lifespan do it),
    and reach it in handlers through ``Depends(get_sse)``.

    Every publishing method (:meth:`broadcast`, :meth:`broadcast_all`, :meth:`send_to`) works without ``await``
    from async handlers, sync handlers, background tasks and other threads; the data is validated and encoded in
    the caller's thread, so a bad event raises right there (the data of an event declared in ``events`` is
    validated against its model). The ``publish*`` coroutines do the same and return once the backend has
    accepted (and stored) the event.
    """

    def __init__(
        self, settings: SSESettings | None = None, *, backend: Backend | None = None, events: EventTypes | None = None
    ) -> None:
        self.settings = settings = settings if settings is not None else load_settings()
        self.backend = backend = backend if backend is not None else backend_for(settings)
        self.worker_id = new_worker_id()
        self._threads = LoopThread()
        self._running = self._closing = False
        self._tasks = Tasks()
        self._signals = SignalHandlers()
        self._counters = counters = Counters()
        self._admission = Admission(settings, counters, events, positions=not backend.ordered)
        self.events = events
        """The typed events (:class:`EventTypes`) whose data every publish validates, or None."""
        self._registry = registry = Registry(
            on_first=lambda channel: self._cluster.interest(channel, True),
            on_last=lambda channel: self._cluster.interest(channel, False),
            on_close=self._closed,
            on_presence=lambda *change: self._present.changed(*change),
        )
        self._writer = writer = Writer(counters)
        self._fanout = Fanout(registry, writer, counters, settings.overflow_policy)
        self._cluster = make_cluster(
            backend, registry, self._admission, self.stats, counters, self.worker_id, lambda: self._closing
        )
        self._streams = Streams(
            settings, backend, registry, self._cluster, counters, writer,
            worker_id=self.worker_id, on_overflow=self._fanout.overflow, on_stop=self.drain,
        )  # fmt: skip
        self._publisher = Publisher(backend, counters, settings, writer)
        self._present = make_presence(
            backend, self._admission, registry, self._publisher.publish_nowait, self.worker_id
        )
        self.presence = Presence(self._admission, self._present.members, backend, self._watch)
        """Who is on each channel, across workers, and its join/leave events (:class:`Presence`)."""
        self.runs = Runs(
            settings, self._admission, self._publisher, backend, backend.runs or MemoryRunLedger(), registry,
            worker_id=self.worker_id, open_client=lambda: self.add_client(""), view=self._streams.view_run,
            spawn=self._tasks.spawn,
        )  # fmt: skip
        """Runs: streams of one producer's events that viewers resume (:class:`Runs`)."""

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Connect the backend and start the service's tasks; called by the lifespan."""
        if self._running:
            return
        self._threads.bind()
        self._publisher.start(self._threads, self._tasks.spawn)
        await self.backend.start(self._fanout)
        self._running, self._closing = True, False
        self._tasks.spawn(sweep(self._registry, self.settings))
        self._tasks.spawn(self._writer.run())
        self._tasks.spawn(self.runs.watch())
        self._tasks.spawn(self._present.run())
        await self._cluster.start(self._tasks.spawn)

    async def aclose(self, grace: float = 5.0) -> None:
        """End every stream, wait up to ``grace`` seconds for them, stop the backend."""
        if not self._running:
            return
        self.shutdown()
        await self._streams.wait_ended(grace)
        await self._publisher.flush(grace)
        await self._tasks.stop(grace)
        await self._cluster.stop()
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

    @_hop
    def shutdown(self) -> None:
        """Close every connection: each stream sends what it has buffered, then ends.

        New connections are refused from now on. Browsers reconnect after the retry
        interval (to another worker, or to this one once it is back) and replay.
        """
        self._closing = True
        for client in self._registry:
            self._registry.close(client, DisconnectReason.SHUTDOWN, discard=False)

    @_hop
    def drain(self) -> None:
        """Like :meth:`shutdown`, but end the streams in waves over ``drain_window``
        seconds, so that their reconnects reach the other workers at an even rate.
        New connections are refused (told to come back later) from now on."""
        if self.settings.drain_window <= 0 or not self._registry:
            return self.shutdown()
        self._closing = True
        end = lambda client: self._registry.close(client, DisconnectReason.SHUTDOWN, discard=False)  # noqa: E731
        self._tasks.spawn(end_in_waves(list(self._registry), self.settings.drain_window, end))

    def install_signal_handlers(self) -> None:
        """Start the drain (:meth:`drain`) as soon as SIGINT or SIGTERM arrives, then let
        the server's own handler run. Without this, uvicorn waits for open streams
        before it runs the app's shutdown. Does nothing outside the main thread."""
        self._signals.install(self._threads.loop, self.drain)

    def restore_signal_handlers(self) -> None:
        """Put back the handlers :meth:`install_signal_handlers` replaced."""
        self._signals.restore()

    # -- clients --------------------------------------------------------------------

    @_hop
    def add_client(
        self, last_event_id: str | None = None, *, identity: str | None = None
    ) -> tuple[SSEClient, SSEResponse]:
        """Create a client and the response that streams to it; return the response
        from the handler.

        The stream replays what the client missed on every channel it is subscribed to before the response
        starts, from ``last_event_id``: by default the request's own ``Last-Event-ID`` header (what EventSource
        sends on every reconnect), or its ``last_event_id`` query parameter for a first connection. Pass ``""``
        to start fresh. ``identity`` (e.g. the user id) applies ``max_connections_per_identity``, across every
        worker with a shared backend. When load, a limit or shutdown refuses the stream, the client comes back
        already closed (``close_reason == "refused"``) with a response that tells the browser when to come back;
        return it as usual (with ``hard_refusals`` this raises :class:`LimitExceededError`, an
        ``HTTPException``, instead). A malformed ``last_event_id`` raises :class:`BadRequestError`. If the
        handler ends without returning the response (it raised its own 400 or 403, or returned something else),
        the client is released when the request ends.
        """
        self._require_running()
        if last_event_id is None:
            last_event_id = middleware.current_last_event_id()
        if not self._closing:
            last_event_id = self._admission.cursor(last_event_id)
        refusal = self._admission.refusal(closing=self._closing, open_streams=len(self._registry))
        if refusal is None and identity is not None:
            refusal = self._cluster.admit(identity)
        if refusal is not None:
            return self._streams.refuse(refusal)
        client, response = self._streams.open(last_event_id, identity)
        middleware.opened(client, self.remove_unstarted)
        return client, response

    @_hop
    def remove_client(self, client_id: str) -> bool:
        """Disconnect a client: its stream sends what is buffered, then ends."""
        client = self._registry.get(client_id)
        return client is not None and self._registry.close(client, DisconnectReason.REMOVED, discard=False)

    def remove_unstarted(self, client: SSEClient) -> None:
        """Release a client whose response will never run (the handler gives up on it)
        now; the end of its request does it otherwise."""
        self._streams.release_unstarted(client)

    def get_client(self, client_id: str) -> SSEClient | None:
        """The connected client with this id, or None."""
        return self._registry.get(client_id)

    def get_clients(self) -> list[SSEClient]:
        """Every client connected to this process (this worker's view, not the
        cluster's), oldest first."""
        return list(self._registry)

    def get_clients_by_channel(self, channel: str) -> list[SSEClient]:
        """Clients of this process subscribed to ``channel`` (this worker's view, not
        the cluster's), oldest subscription first."""
        return list((self._registry.members(channel) or {}).values())

    def get_clients_by_identity(self, identity: str) -> list[SSEClient]:
        """Clients of this process opened with ``identity`` (this worker's view), oldest first."""
        return list(self._registry.of_identity(identity).values())

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
        await self._cluster.claim(client)

    @_hop
    def subscribe(self, client_id: str, channel: str) -> bool:
        """Subscribe a client to a channel; False when there is no such client.

        Raises :class:`InvalidChannelError` for a malformed name and
        :class:`LimitExceededError` past ``max_channels_per_connection``.
        """
        self._admission.check_channel(channel)
        client = self._registry.get(client_id)
        if client is None:
            return False
        if channel not in client.channels:
            self._admission.check_subscription(client)
            self._registry.subscribe(client, channel)
        return True

    @_hop
    def unsubscribe(self, client_id: str, channel: str) -> bool:
        """Unsubscribe a client from a channel; False when it was not subscribed."""
        client = self._registry.get(client_id)
        if client is None or channel not in client.channels:
            return False
        self._registry.unsubscribe(client, channel)
        return True

    @_hop
    def _watch(self, client_id: str, channel: str) -> bool:
        client = self._registry.get(client_id)
        if client is not None and channel not in client.channels:
            self._registry.subscribe(client, channel)
        return client is not None

    def check_channel(self, channel: str) -> str:
        """Raise :class:`InvalidChannelError` unless ``channel`` is a valid name."""
        return self._admission.check_channel(channel)

    # -- publishing -----------------------------------------------------------------

    def broadcast(self, channel: str, event: str, data: Any, id: str | None = None) -> None:
        """Send an event to every subscriber of ``channel``, on every worker."""
        self._publish_nowait(self._admission.event(channel, event, data, id))

    def broadcast_all(self, event: str, data: Any, id: str | None = None) -> None:
        """Send an event to every connected client."""
        self._publish_nowait(self._admission.to_all(event, data, id))

    def send_to(self, client_id: str, event: str, data: Any, id: str | None = None) -> bool:
        """Send an event to one client; False when there is no such client.

        With a shared backend a client of another worker counts: the event goes to
        the worker named in the client id, which drops it if the client is gone.
        """
        if (publication := self._cluster.to_client(client_id, self._admission.encode(event, data, id), id)) is None:
            return False
        self._publish_nowait(publication)
        return True

    async def publish(self, channel: str, event: str, data: Any, id: str | None = None) -> str:
        """Like :meth:`broadcast`, but return the event's id once the backend has
        stored and announced it; raises :class:`BackendError` when it cannot."""
        return await self._publish(self._admission.event(channel, event, data, id))

    async def publish_many(self, events: Iterable[EventSpec]) -> list[str]:
        """Publish several events, in order, and return their ids once the backend has
        stored and announced them all: one round trip to a remote backend.

        Each event is a tuple ``(channel, event, data)`` or ``(channel, event, data, id)``,
        as the arguments of :meth:`publish`. Every event is validated and encoded first,
        so a bad one raises (:class:`InvalidChannelError`, :class:`InvalidEventError`)
        before any is sent. Raises :class:`BackendError` when the backend cannot take
        them; then the first events of the batch may have been published.
        """
        publications = [self._admission.event(c, e, d, rest[0] if rest else None) for c, e, d, *rest in events]
        self._require_running()
        return [message.id for message in await self._publisher.publish_many(publications)]

    async def publish_all(self, event: str, data: Any, id: str | None = None) -> str:
        """Like :meth:`broadcast_all`, awaited; returns the event's id."""
        return await self._publish(self._admission.to_all(event, data, id))

    async def publish_to(self, client_id: str, event: str, data: Any, id: str | None = None) -> str | None:
        """Like :meth:`send_to`, awaited; returns the event's id, or None for an unknown client."""
        publication = self._cluster.to_client(client_id, self._admission.encode(event, data, id), id)
        return None if publication is None else await self._publish(publication)

    def _publish_nowait(self, publication: Publication) -> None:
        self._require_running()
        self._publisher.publish_nowait(publication)

    async def _publish(self, publication: Publication) -> str:
        self._require_running()
        return (await self._publisher.publish_many([publication]))[0].id

    def _require_running(self) -> None:
        if not self._running:
            raise ServiceNotRunningError(
                "the SSE service is not running: include the router from create_sse_router(...) in your app, "
                "use lifespan=sse_lifespan(), or start it with 'async with SSEService(...)'"
            )

    # -- stats ----------------------------------------------------------------------

    @property
    def counters(self) -> Counters:
        """The running totals behind :meth:`stats` and the metrics (read them, do not change them)."""
        return self._counters

    def stats(self) -> ConnectionStats:
        """Connection statistics of this process (the admin connections view, and more);
        :meth:`cluster_stats` adds up every worker sharing the backend."""
        return snapshot(
            self._counters,
            self._registry,
            worker_id=self.worker_id,
            backend=self.settings.backend,
            pending=self._publisher.pending,
            streaming=len(self._streams.running),
        )

    async def cluster_stats(self) -> ConnectionStats:
        """Statistics of every worker sharing the backend; this worker's alone when
        the backend is in-process (then ``scope`` is ``worker``).

        Each worker registers its stats in the backend every ``presence_interval``
        seconds; a worker silent for three intervals (stopped, killed) drops out.
        Raises :class:`BackendError` when the backend cannot be read.
        """
        return await self._cluster.totals()

    # -- what the parts tell the service ------------------------------------------------

    def _closed(self, client: SSEClient, reason: str) -> None:
        self._cluster.release(client)
        self._counters.disconnects[reason] += 1


__all__ = ["ALL_CHANNEL", "GAP_EVENT", "SSEService"]
