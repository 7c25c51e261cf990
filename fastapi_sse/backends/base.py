"""The backend contract: move bytes between processes and keep history with ids.

A backend knows nothing of clients, SSE framing, heartbeats or JSON. It gives each
published message a sequence number, increasing across every channel, hands
messages of the channels this process listens to back to the service, and answers
"what came on these channels after sequence N".

Ids given by a publisher are indexed per channel, so that a client's ``Last-Event-ID``
resolves only among the events it may read (see :meth:`Backend.resolve`).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fastapi_sse.backends._ledger import RunLedger, RunState


# Message and Publication are made for every event: not frozen, since a frozen
# dataclass's __init__ costs about four times as much (object.__setattr__ per field).
# Treat them as values all the same: nothing changes one once it is made.
@dataclass(slots=True, unsafe_hash=True)
class Message:
    """One published event as a backend stores and delivers it."""

    seq: int
    """Position in the backend's single sequence, increasing across channels."""
    channel: str
    id: str
    """The id the client sees: the publisher's own, or ``str(seq)``."""
    payload: bytes
    """Opaque bytes given to :meth:`Backend.publish`."""


@dataclass(frozen=True, slots=True)
class Replay:
    """The answer to :meth:`Backend.replay`."""

    messages: Sequence[Message]
    """Messages after the cursor on the continuous channels, in sequence order."""
    head: int
    """The newest sequence number when the replay was read."""
    gaps: frozenset[str] = field(default_factory=frozenset)
    """Channels whose history no longer reaches back to the cursor."""
    floors: Mapping[str, int] | None = None
    """For each channel, the sequence number after which its history is complete, when
    the backend reports it: then one read also answers a later cursor on a channel
    that is no gap for the read's own cursor."""
    heads: Mapping[str, int] | None = None
    """For a backend that numbers each channel on its own (not :attr:`Backend.ordered`),
    each channel's head when the replay was read."""


_next_publication_key = itertools.count(1).__next__


@dataclass(slots=True, unsafe_hash=True)
class Publication:
    """One event to publish, as the service hands it to :meth:`Backend.publish_many`."""

    channel: str
    payload: bytes
    """Opaque bytes, delivered as they are."""
    event_id: str | None
    """The publisher's id, or None to use the sequence number."""
    store: bool
    """Keep it in the channel's history (False for events to one client)."""
    index: Collection[str] = ()
    """More channels the id resolves through, as ``index`` of :meth:`Backend.publish`."""
    history: int | None = None
    """Events the channel's history keeps once this one is stored, instead of the
    backend's own size (a run keeps all its events), as in :meth:`Backend.publish`."""
    key: int = field(default_factory=_next_publication_key)
    """Unique in this process, drawn once when the event is queued. A batch sent again
    after a failure carries the same keys, so a backend can recognise what it stored."""


class Sink(Protocol):
    """Where a backend hands what it receives: the service's side of :meth:`Backend.start`."""

    def deliver(self, message: Message) -> None:
        """Fan one message of a listened channel out to this process's clients."""

    def lost(self, channels: Collection[str]) -> None:
        """A remote backend could not deliver what these channels missed (history no
        longer held it after a reconnection): their clients must resume."""

    async def settle(self) -> None:
        """Awaited between batches of a burst of deliveries, so that the streams write
        one batch before the next arrives (a fast reader is then not taken for a slow
        consumer)."""


class Backend(ABC):
    """The transport: carry messages between processes and keep their history.

    Subclasses implement the abstract methods. A backend shared by many processes
    (``remote``) also offers :attr:`coordination`.
    """

    remote: bool = False
    ordered: bool = True
    """True when one sequence numbers every channel's events (a cursor is one number);
    False when each channel has its own (a cursor is a position per channel, and
    :meth:`replay` takes one)."""
    """True when messages arrive asynchronously from another process, so the
    service must wait for :meth:`listen` before reading history."""

    coordination: Coordination | None = None
    """What makes the workers sharing this backend one service; None for one process."""

    runs: RunLedger | None = None
    """The state of runs (who produces each, whether it ended or must stop), shared by
    the workers; None to keep it in this process."""

    errors: int = 0
    """Failures the backend handled itself without raising to the service (e.g. a
    lost subscription connection); the service counts those that reach it. Exported
    by the metrics with them as ``fastapi_sse_backend_errors_total``."""

    reconnects: int = 0
    """Times the backend re-established a lost connection to its store
    (``fastapi_sse_backend_reconnects_total``)."""

    @abstractmethod
    async def start(self, sink: Sink) -> None:
        """Connect; from now on hand every message of a listened channel to ``sink``."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect and release every resource."""

    @abstractmethod
    async def listen(self, channels: Collection[str]) -> None:
        """Start delivering these channels to this process; return once they are live."""

    @abstractmethod
    async def unlisten(self, channels: Collection[str]) -> None:
        """Stop delivering these channels to this process."""

    @abstractmethod
    async def publish(
        self,
        channel: str,
        payload: bytes,
        event_id: str | None,
        *,
        store: bool,
        index: Collection[str] = (),
        history: int | None = None,
    ) -> Message:
        """Assign the next sequence number, keep the message in the channel's history
        if ``store``, and deliver it to every process listening to ``channel``; storing
        and announcing are one atomic step. ``history`` (when given) is how many events
        the channel's history keeps once this one is stored, instead of the backend's
        own size.

        A publisher's ``event_id`` is indexed for :meth:`resolve` under ``channel``
        when the message is stored, and under every channel of ``index``: for a
        message kept out of history (one client's), the channels its recipient reads,
        so that the recipient resumes from it after reconnecting as a new client.
        An id indexed twice under one channel is marked repeated there."""

    async def publish_many(self, publications: Sequence[Publication]) -> list[Message]:
        """Publish every event, in order, as :meth:`publish` does each; return their
        messages in the same order. Backends override it to send a batch at once (one
        round trip); a batch sent again with the same :attr:`Publication.key` values
        after a failure must not be stored twice. On error, a prefix of the batch may
        have been published."""
        messages = []
        for p in publications:
            # ``history`` only when set: a backend written before it keeps working.
            extra = {} if p.history is None else {"history": p.history}
            messages.append(await self.publish(p.channel, p.payload, p.event_id, store=p.store, index=p.index, **extra))
        return messages

    def publish_nowait(
        self,
        channel: str,
        payload: bytes,
        event_id: str | None,
        *,
        store: bool,
        index: Collection[str] = (),
        history: int | None = None,
    ) -> Message | None:
        """Publish synchronously when the backend can (in-process ones); None otherwise."""
        return None

    @abstractmethod
    async def head(self) -> int:
        """The newest sequence number assigned (0 before the first)."""

    async def heads(self, channels: Collection[str]) -> dict[str, int]:
        """Each channel's head: an event published from now on comes after it."""
        head = await self.head()
        return dict.fromkeys(channels, head)

    @abstractmethod
    async def resolve(self, event_id: str, channels: Collection[str]) -> int | None:
        """The sequence number a client reading ``channels`` resumes after, or None
        when the id is unknown to it.

        A publisher's id resolves only through the channels it was indexed under (see
        :meth:`publish`): exactly one message with that id among ``channels`` gives its
        sequence number; none, or more than one (an id repeated on a channel, or found
        on several of them), gives None, so that a repeated id never makes a resume
        skip events and a client cannot learn whether an id exists on a channel it
        does not read. The decimal form of a sequence number resolves to itself while
        it is not past :meth:`head`."""

    @abstractmethod
    async def replay(self, channels: Collection[str], after: int | None) -> Replay:
        """Stored messages with ``seq > after`` on ``channels``. A channel whose history
        was trimmed past ``after`` is reported in ``gaps`` and its messages left out;
        ``after=None`` (an unknown cursor) makes every channel a gap. History past its
        age is the backend's own to drop."""

    async def replay_each(self, cursors: Mapping[str, int]) -> Replay:
        """Stored messages on each channel of ``cursors`` after its own cursor, as
        :meth:`replay` answers for one cursor: what a stream reads when the backend
        is not :attr:`ordered`. An ordered backend reads from the oldest cursor."""
        replay = await self.replay(cursors, min(cursors.values(), default=0))
        messages = [m for m in replay.messages if m.seq > cursors[m.channel]]
        return Replay(messages, replay.head, replay.gaps, replay.floors)


class Coordination(ABC):
    """What workers sharing one store need to act as one service: a registry of live
    workers (with their stats), groups capped across workers (connections per
    identity) and presence. A shared backend offers it as :attr:`Backend.coordination`."""

    @abstractmethod
    async def announce(self, worker_id: str, info: bytes, ttl: float) -> bool:
        """Register a worker and its opaque ``info`` for ``ttl`` seconds; True when it
        was still registered (a refresh), False when the store no longer had it."""

    @abstractmethod
    async def withdraw(self, worker_id: str) -> None:
        """Remove a worker's registration."""

    @abstractmethod
    async def peers(self) -> dict[str, bytes]:
        """The ``info`` of every registered worker, by worker id."""

    @abstractmethod
    async def claim(self, group: str, member: str, limit: int, *, evict: bool) -> list[str] | None:
        """Add ``member`` (``<worker id>.<rest>``) to a group capped at ``limit`` across
        workers; members of workers no longer registered do not count. When it is full,
        return the oldest members removed to make room if ``evict``, else None (refused)."""

    @abstractmethod
    async def release(self, group: str, member: str) -> None:
        """Remove ``member`` from a group made by :meth:`claim`."""

    @abstractmethod
    async def reclaim(self, groups: dict[str, list[str]]) -> None:
        """Put members back in their groups, oldest first, where the store lost them
        (it restarted empty, or was flushed), without evicting anyone."""

    @abstractmethod
    async def present(self, channel: str, worker_id: str, identity: str, streams: int) -> tuple[int, int]:
        """Set how many streams ``identity`` has on ``channel`` at ``worker_id``; its
        streams across the live workers before and after."""

    @abstractmethod
    async def presence(self, channel: str) -> dict[str, int]:
        """Who is on ``channel``: identity -> streams, across the live workers."""

    @abstractmethod
    async def absent(self) -> list[tuple[str, str]]:
        """Forget what workers no longer registered held; the ``(channel, identity)``
        pairs that left the cluster with them (each reported to one caller)."""


class NoCoordination(Coordination):
    """Coordination for a worker alone: every worker is itself, every group admits."""

    def __init__(self) -> None:
        self._present: dict[str, dict[str, int]] = {}

    async def announce(self, worker_id: str, info: bytes, ttl: float) -> bool:
        return True

    async def withdraw(self, worker_id: str) -> None:
        return None

    async def peers(self) -> dict[str, bytes]:
        return {}

    async def claim(self, group: str, member: str, limit: int, *, evict: bool) -> list[str] | None:
        return []

    async def release(self, group: str, member: str) -> None:
        return None

    async def reclaim(self, groups: dict[str, list[str]]) -> None:
        return None

    async def present(self, channel: str, worker_id: str, identity: str, streams: int) -> tuple[int, int]:
        here = self._present.setdefault(channel, {})
        before = here.get(identity, 0)
        if streams:
            here[identity] = streams
        else:
            here.pop(identity, None)
        return before, streams

    async def presence(self, channel: str) -> dict[str, int]:
        return dict(self._present.get(channel, {}))

    async def absent(self) -> list[tuple[str, str]]:
        return []


__all__ = [
    "Backend",
    "Coordination",
    "Message",
    "NoCoordination",
    "Publication",
    "Replay",
    "RunLedger",
    "RunState",
    "Sink",
]
