"""Presence: who is on a channel, across every worker, and the ``presence`` events
that say when an identity joins or leaves it.

With the ``presence`` setting on, an identity is on a channel while one of its streams (opened with ``identity``, the
router's ``identify``) is subscribed to it, on any worker. Subscribers that ask for
presence (``sse.presence.watch``, the router's ``presence=true``) receive, in band, a
``presence`` event each time an identity joins (its first stream, cluster-wide) or
leaves (its last one; or its worker died and its registration lapsed)::

    {"channel": "doc:1", "identity": "alice", "state": "joined", "streams": 1}

:meth:`Presence.snapshot` tells who is there now, with a cursor: open the stream with
it as ``last_event_id`` and the events that follow the snapshot come, none missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, Field

from fastapi_sse import _positions
from fastapi_sse._admission import Admission
from fastapi_sse._names import ALL_CHANNEL, PRESENCE_EVENT, presence_channel
from fastapi_sse._registry import Registry
from fastapi_sse.backends.base import Backend, Coordination, NoCoordination, Publication
from fastapi_sse.errors import BadRequestError

logger = logging.getLogger("fastapi_sse")


class PresenceSnapshot(BaseModel):
    """Who is on a channel, and the cursor its later ``presence`` events come after."""

    channel: str
    members: dict[str, int] = Field(description="Identity -> its open streams on the channel, on every worker.")
    cursor: str = Field(description="Pass it as last_event_id: the presence events after the snapshot follow.")


def presence_event(admission: Admission, channel: str, identity: str, streams: int) -> Publication:
    state: Literal["joined", "left"] = "joined" if streams else "left"
    data: dict[str, Any] = {"channel": channel, "identity": identity, "state": state, "streams": streams}
    return Publication(presence_channel(channel), admission.encode(PRESENCE_EVENT, data, None), None, True)


class Presence:
    """Presence of a service, as ``sse.presence``."""

    def __init__(
        self,
        admission: Admission,
        members: Callable[[str], Awaitable[dict[str, int]]],
        backend: Backend,
        subscribe: Callable[[str, str], bool],
    ) -> None:
        self._admission = admission
        self._members = members
        self._backend = backend
        self._subscribe = subscribe

    def _require(self) -> None:
        if not self._admission.settings.presence:
            raise BadRequestError("presence is off: turn it on with presence=True (SSE_PRESENCE=true)")

    def watch(self, client_id: str, channel: str) -> bool:
        """Send a client the ``presence`` events of ``channel`` (it need not be
        subscribed to the channel itself); False when there is no such client.
        Raises :class:`BadRequestError` while the ``presence`` setting is off."""
        self._require()
        self._admission.check_channel(channel)
        return self._subscribe(client_id, presence_channel(channel))

    async def snapshot(self, channel: str) -> PresenceSnapshot:
        """Who is on ``channel`` now, on every worker, and the cursor after which its
        ``presence`` events come. Raises :class:`BackendError` when the backend
        cannot be read, :class:`BadRequestError` while the ``presence`` setting is off."""
        self._require()
        self._admission.check_channel(channel)
        # A page's stream reads the channel, its presence and the service's own channel.
        cursor = await _positions.cursor_at(self._backend, [channel, presence_channel(channel), ALL_CHANNEL])
        return PresenceSnapshot(channel=channel, members=await self._members(channel), cursor=cursor)


Publish = Callable[[Publication], None]


class LocalPresence:
    """Presence in one process: the registry's counts, events on local transitions."""

    def __init__(self, admission: Admission, registry: Registry, publish: Publish) -> None:
        self.admission = admission
        self.registry = registry
        self.publish = publish

    def changed(self, channel: str, identity: str, before: int, after: int) -> None:
        """The registry's hook: an identity's streams on a channel here went from
        ``before`` to ``after``."""
        if (before == 0) != (after == 0) and self.admission.settings.presence:
            self.publish(presence_event(self.admission, channel, identity, after))

    async def members(self, channel: str) -> dict[str, int]:
        return dict(self.registry.present.get(channel, {}))

    async def run(self) -> None:
        return None


class SharedPresence(LocalPresence):
    """Presence across the workers of a shared backend, kept by its Coordination: each
    worker sets its own counts (one task, latest count per identity and channel) and
    publishes an event when the cluster-wide count starts or stops; every
    ``presence_interval`` it also asks for the identities that left with a worker
    that died, and publishes their leaves."""

    def __init__(
        self, admission: Admission, registry: Registry, publish: Publish, coordination: Coordination, worker_id: str
    ) -> None:
        super().__init__(admission, registry, publish)
        self.coordination = coordination
        self.worker_id = worker_id
        self._pending: dict[tuple[str, str], int] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def changed(self, channel: str, identity: str, before: int, after: int) -> None:
        self._pending[(channel, identity)] = after
        self._idle.clear()
        self._wake.set()

    async def members(self, channel: str) -> dict[str, int]:
        await self._idle.wait()  # this worker's own changes first
        return await self.coordination.presence(channel)

    async def run(self) -> None:
        interval = self.admission.settings.presence_interval
        loop = asyncio.get_running_loop()
        next_reap = loop.time() + interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_reap - loop.time())):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._sync()
                if loop.time() >= next_reap:
                    next_reap = loop.time() + interval
                    for channel, identity in await self.coordination.absent():
                        self.publish(presence_event(self.admission, channel, identity, 0))
            except Exception as exc:
                logger.warning("could not update presence in the shared backend (%s); retrying", exc)
                self._wake.set()
                await asyncio.sleep(min(interval, 0.5))

    async def _sync(self) -> None:
        while self._pending:
            (channel, identity), streams = next(iter(self._pending.items()))
            before, after = await self.coordination.present(channel, self.worker_id, identity, streams)
            if self._pending.get((channel, identity)) == streams:
                del self._pending[(channel, identity)]
            if (before == 0) != (after == 0):
                self.publish(presence_event(self.admission, channel, identity, after))
        self._idle.set()


def make_presence(
    backend: Backend, admission: Admission, registry: Registry, publish: Publish, worker_id: str
) -> LocalPresence:
    """A service's presence: shared for a ``remote`` backend (over its coordination), else local."""
    if not backend.remote or not admission.settings.presence:
        return LocalPresence(admission, registry, publish)
    coordination = backend.coordination or NoCoordination()
    return SharedPresence(admission, registry, publish, coordination, worker_id)
