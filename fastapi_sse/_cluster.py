"""What makes the workers sharing a backend one service, and its one-process variant.

:class:`LocalCluster` is one process: limits per identity are counted in its
registry, and there is nobody to tell anything. :class:`SharedCluster` runs over a
backend's :class:`~fastapi_sse.backends.base.Coordination`: it tells the backend which
channels this worker needs (in batches), keeps the worker registered with its stats,
caps an identity's streams across workers and adds up every worker's stats. The
service picks one when it is built: the shared one for a ``remote`` backend, over
its ``coordination`` (a backend without one shares messages and history only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi_sse._admission import Admission
from fastapi_sse._counters import Counters
from fastapi_sse._names import CLOSE, client_channel, identity_group, is_client_id
from fastapi_sse._registry import Registry, readable
from fastapi_sse.backends.base import Backend, Coordination, NoCoordination, Publication
from fastapi_sse.client import DisconnectReason, SSEClient
from fastapi_sse.errors import BackendError, LimitExceededError
from fastapi_sse.stats import ConnectionStats

logger = logging.getLogger("fastapi_sse")

Spawn = Callable[[Coroutine[Any, Any, None]], None]


class LocalCluster:
    """One process alone: see the module's docstring."""

    opening_timeout: float | None = None
    """How long a stream's opening may wait for the backend (None: no limit)."""

    def __init__(self, registry: Registry, admission: Admission, stats: Callable[[], ConnectionStats]) -> None:
        self.registry = registry
        self.admission = admission
        self.stats = stats

    async def start(self, spawn: Spawn) -> None:
        return None

    async def stop(self) -> None:
        return None

    def interest(self, channel: str, listen: bool) -> None:
        """A channel got its first listener here (``listen``) or lost its last one."""

    async def synced(self) -> None:
        """Return once the backend delivers every channel joined so far."""

    def admit(self, identity: str) -> LimitExceededError | None:
        """Make room for one more stream of ``identity``, or say why there is none."""
        settings = self.admission.settings
        existing = self.registry.of_identity(identity)
        if len(existing) < settings.max_connections_per_identity:
            return None
        if settings.identity_limit_policy == "refuse":
            return self.admission.identity_refusal()
        while len(existing) >= settings.max_connections_per_identity:
            self.registry.close(next(iter(existing.values())), DisconnectReason.REPLACED, discard=False)
        return None

    async def claim(self, client: SSEClient) -> None:
        """Count a stream against its identity's limit across workers (see
        :meth:`SSEService.enforce_identity_limit`)."""

    def release(self, client: SSEClient) -> None:
        """A client closed: give back what it holds across workers."""

    def reachable(self, client_id: str) -> bool:
        """Whether an event for ``client_id`` can reach a client."""
        return self.registry.get(client_id) is not None

    def to_client(self, client_id: str, payload: bytes, event_id: str | None) -> Publication | None:
        """An event for one client, kept out of history; None when it cannot reach one.
        Its id resolves, once that client resumes as a new one, through what it reads
        now (a client of another worker is unknown here: its resume from the id is a gap)."""
        if not self.reachable(client_id):
            return None
        client = self.registry.get(client_id)
        index = readable(client) if client is not None and event_id is not None else ()
        return Publication(client_channel(client_id), payload, event_id, False, index)

    async def totals(self) -> ConnectionStats:
        """The stats of every worker, added up."""
        return self.stats()


class SharedCluster(LocalCluster):
    """Many workers over one shared backend: see the module's docstring."""

    def __init__(
        self,
        registry: Registry,
        admission: Admission,
        stats: Callable[[], ConnectionStats],
        *,
        backend: Backend,
        coordination: Coordination,
        counters: Counters,
        worker_id: str,
        closing: Callable[[], bool],
    ) -> None:
        super().__init__(registry, admission, stats)
        self.backend = backend
        self.coordination = coordination
        self.counters = counters
        self.worker_id = worker_id
        self.closing = closing
        self.opening_timeout = admission.settings.redis_timeout * 2
        self._pending: dict[str, bool] = {}
        self._synced = asyncio.Condition()
        self._generation = 0
        self._done = 0
        self._wake = asyncio.Event()
        # Clients whose identity holds a slot in the shared store (claimed once).
        self._claimed: set[str] = set()
        self._announced = False
        self._spawn: Spawn | None = None

    async def start(self, spawn: Spawn) -> None:
        self._spawn = spawn
        spawn(self._sync_interest())
        # Registered before the first request: shared limits count only live workers.
        try:
            await self._announce()
        except Exception as exc:
            self.counters.backend_errors += 1
            logger.warning("could not register this worker: %s", exc)
        spawn(self._presence())

    async def stop(self) -> None:
        # Best effort: a worker that cannot say goodbye drops out once its TTL ends.
        with contextlib.suppress(Exception):
            await self.coordination.withdraw(self.worker_id)

    # -- channel interest ---------------------------------------------------------------

    def interest(self, channel: str, listen: bool) -> None:
        self._pending[channel] = listen
        self._generation += 1
        self._wake.set()

    async def synced(self) -> None:
        target = self._generation
        async with self._synced:
            await self._synced.wait_for(lambda: self._done >= target)

    async def _sync_interest(self) -> None:
        """Tell the backend which channels this process needs, in batches."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, {}
            generation = self._generation
            listen = [c for c, on in pending.items() if on]
            unlisten = [c for c, on in pending.items() if not on and self.registry.members(c) is None]
            try:
                if unlisten:
                    await self.backend.unlisten(unlisten)
                if listen:
                    await self.backend.listen(listen)
            except Exception:
                self.counters.backend_errors += 1
                logger.exception("could not update the backend's channel subscriptions; retrying")
                for channel in listen:
                    self._pending.setdefault(channel, True)
                self._wake.set()
                await asyncio.sleep(0.5)
                continue
            async with self._synced:
                self._done = generation
                self._synced.notify_all()

    # -- identities ---------------------------------------------------------------------

    def admit(self, identity: str) -> LimitExceededError | None:
        return None  # counted across workers when the stream starts: claim()

    async def claim(self, client: SSEClient) -> None:
        if client.identity is None or client.closed or client.id in self._claimed:
            return
        self._claimed.add(client.id)
        settings = self.admission.settings
        refuse = settings.identity_limit_policy == "refuse"
        try:
            evicted = await self.coordination.claim(
                identity_group(client.identity), client.id, settings.max_connections_per_identity, evict=not refuse
            )
        except Exception as exc:
            self.counters.backend_errors += 1
            logger.warning("could not check the connection limit of an identity (%s); allowing the stream", exc)
            return
        if client.closed:
            # Closed while the claim was on its way: give back what it may have taken.
            await self._release(client)
            return
        if evicted is None:
            self.counters.refused["max_connections_per_identity"] += 1
            self.registry.close(client, DisconnectReason.REMOVED, discard=True)
            raise self.admission.identity_refusal()
        for victim in evicted:
            local = self.registry.get(victim)
            if local is not None:
                self.registry.close(local, DisconnectReason.REPLACED, discard=False)
                continue
            try:
                # An empty message on a client's channel tells its worker to close it.
                await self.backend.publish(client_channel(victim), CLOSE, None, store=False)
            except Exception as exc:
                self.counters.backend_errors += 1
                logger.warning("could not ask another worker to close stream %s: %s", victim, exc)

    def release(self, client: SSEClient) -> None:
        if client.id in self._claimed and self._spawn is not None:
            self._claimed.discard(client.id)
            self._spawn(self._release(client))

    async def _release(self, client: SSEClient) -> None:
        try:
            await self.coordination.release(identity_group(str(client.identity)), client.id)
        except Exception as exc:
            self.counters.backend_errors += 1
            logger.warning("could not release the identity slot of stream %s: %s", client.id, exc)

    def reachable(self, client_id: str) -> bool:
        """This worker's client, or one of another worker (``<worker_id>.<32 hex>``)."""
        return self.registry.get(client_id) is not None or is_client_id(client_id)

    # -- presence and stats ---------------------------------------------------------------

    async def _announce(self) -> None:
        ttl = self.admission.settings.presence_interval * 3
        known = await self.coordination.announce(self.worker_id, self.stats().model_dump_json().encode(), ttl)
        if known is False and self._announced:
            # The store lost this worker's registration, and with it the identity slots
            # of its streams: put them back, or the limits would forget open streams.
            logger.warning("the shared backend lost this worker's registration; restoring its identity slots")
            held = [c for c in map(self.registry.get, self._claimed) if c is not None and c.identity is not None]
            groups: dict[str, list[str]] = {}
            for client in sorted(held, key=lambda c: c.created_at):
                groups.setdefault(identity_group(str(client.identity)), []).append(client.id)
            await self.coordination.reclaim(groups)
        self._announced = True

    async def _presence(self) -> None:
        """Keep this worker's registration (and stats) fresh in the shared backend."""
        task = asyncio.current_task()
        while not self.closing():
            await asyncio.sleep(self.admission.settings.presence_interval)
            try:
                await self._announce()
            except Exception as exc:
                self.counters.backend_errors += 1
                logger.warning("could not refresh this worker's registration: %s", exc)
            # The Redis client can absorb a cancellation that lands mid-command.
            if task is not None and task.cancelling():
                return

    async def totals(self) -> ConnectionStats:
        mine = self.stats()
        try:
            peers = await self.coordination.peers()
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"could not read the other workers' stats: {exc}") from exc
        others = [
            ConnectionStats.model_validate_json(info) for worker, info in peers.items() if worker != self.worker_id
        ]
        return _sum_stats(mine, others)


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


def make_cluster(
    backend: Backend,
    registry: Registry,
    admission: Admission,
    stats: Callable[[], ConnectionStats],
    counters: Counters,
    worker_id: str,
    closing: Callable[[], bool],
) -> LocalCluster:
    """The cluster of a service: shared for a ``remote`` backend, else local."""
    if not backend.remote:
        return LocalCluster(registry, admission, stats)
    coordination = backend.coordination or NoCoordination()
    return SharedCluster(
        registry,
        admission,
        stats,
        backend=backend,
        coordination=coordination,
        counters=counters,
        worker_id=worker_id,
        closing=closing,
    )
