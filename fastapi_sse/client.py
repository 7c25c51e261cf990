"""One connected client: its channels and its bounded buffer of unsent bytes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from fastapi_sse import _positions
from fastapi_sse._names import CLIENT_CHANNEL_PREFIX

if TYPE_CHECKING:
    from fastapi_sse.settings import OverflowPolicy


_NO_CHANNELS: frozenset[str] = frozenset()  # shared: each frozenset() call allocates one


class Frame:
    """Encoded bytes shared by every client that receives one event."""

    __slots__ = ("channel", "created", "data", "seq")

    def __init__(self, seq: int, channel: str, data: bytes, created: float = 0.0) -> None:
        self.seq = seq
        self.channel = channel
        self.data = data
        # time.monotonic() when this process received the event; 0 when not measured.
        self.created = created


class DisconnectReason:
    """Why a client's stream ended, as counted in stats."""

    CLIENT_CLOSED = "client_closed"
    REMOVED = "removed"
    REPLACED = "replaced"
    SLOW_CONSUMER = "slow_consumer"
    SHUTDOWN = "shutdown"
    NEVER_STARTED = "never_started"
    BACKEND_GAP = "backend_gap"
    """The worker was cut off from a shared backend whose history lost events meanwhile."""
    BACKEND_UNAVAILABLE = "backend_unavailable"
    """The stream could not start: the shared backend did not answer."""
    RUN_ENDED = "run_ended"
    """A run viewer's stream, once the run's terminal event is written."""
    REFUSED = "refused"
    """Refused for load, a limit or shutdown: told to come back later (``retry:``)."""


class Outlet(Protocol):
    """The writing side of a client's stream, once it runs (see ``_writer.Outlet``)."""

    parked: bool
    """Nothing left to write: the stream's task waits for the disconnect."""
    queued: bool
    """Already in the writer's queue."""
    sending: bool
    """A write is in progress."""
    last_write: float
    """When the last write ended (the loop's clock)."""
    behind: int | None
    """A run viewer that fell behind: where it catches up from history."""

    def ready(self) -> None:
        """Frames arrived for a parked stream: queue it for the writer."""

    def wake(self) -> None:
        """End the park (the client was closed)."""

    def abandon(self) -> None:
        """Drop a write in progress (the client was closed and discarded)."""


class SSEClient:
    """A client of the service, as ``add_client`` returns it.

    ``channels`` lists the channels it is subscribed to; send to it with
    ``send_to(client.id, ...)``. Its buffer is bounded in bytes; what happens when
    it fills is the ``overflow_policy`` setting.
    """

    __slots__ = (
        "_buffer",
        "_floor",
        "_floors",
        "_limit",
        "_replayed",
        "attached",
        "buffered_bytes",
        "channels",
        "close_reason",
        "closed",
        "created_at",
        "dropped",
        "id",
        "identity",
        "last_event_id",
        "on_overflow",
        "outlet",
        "overflow_policy",
        "positions",
        "taken_seq",
    )

    def __init__(
        self,
        client_id: str,
        *,
        created_at: datetime,
        last_event_id: str | None,
        identity: str | None,
        buffer_limit: int,
        policy: OverflowPolicy,
    ) -> None:
        self.id = client_id
        self.channels: set[str] = set()
        self.created_at = created_at
        self.last_event_id = last_event_id
        self.identity = identity
        self.attached = False
        """Whether its stream started (a response is running for it)."""
        self.closed = False
        self.close_reason: str | None = None
        self.dropped = 0
        self._buffer: list[Frame] = []
        self.buffered_bytes = 0
        """Bytes queued for this client and not yet written (read it, do not change it)."""
        self._limit = buffer_limit
        self.overflow_policy = policy
        """What a full buffer does; the ``overflow_policy`` setting unless changed."""
        self.taken_seq = 0
        """The newest event taken from the buffer to be written."""
        # During a resume, live events up to the replayed head on the replayed
        # channels are already in the replay: skip them.
        self._floor = 0
        self._replayed = _NO_CHANNELS
        self._floors: Mapping[str, int] | None = None
        self.positions: _positions.Positions | None = None
        """Where the stream is on each channel, when the backend numbers each channel
        on its own: its event ids then say so (see ``_positions``); None otherwise."""
        self.on_overflow: Callable[[SSEClient, int], None] | None = None
        """Called with the number of frames dropped, 0 meaning "disconnect this client"."""
        self.outlet: Outlet | None = None
        """Set while its stream runs."""

    def __repr__(self) -> str:
        return f"SSEClient(id={self.id!r}, channels={sorted(self.channels)!r})"

    def push(self, frame: Frame) -> None:
        """Queue a frame for this client; never blocks."""
        if self.closed:
            return
        if frame.seq <= self._floor and frame.channel in self._replayed:
            return
        floors = self._floors
        if floors is not None and frame.seq <= floors.get(frame.channel, 0):
            return
        size = len(frame.data)
        if self.buffered_bytes + size > self._limit and not self._overflow(size):
            return
        self._buffer.append(frame)
        self.buffered_bytes += size
        # A running stream that is not parked takes the buffer itself.
        outlet = self.outlet
        if outlet is not None and outlet.parked and not outlet.queued:
            outlet.ready()

    def skip_replayed(self, head: int, channels: frozenset[str]) -> None:
        """A replay up to ``head`` covered ``channels``: drop live frames it holds."""
        self._floor = head
        self._replayed = channels

    def position(self, channel: str) -> int:
        """The newest event of ``channel`` taken to be written (of any channel, for a
        backend with one sequence)."""
        return self.taken_seq if self.positions is None else self.positions.get(channel)

    def skip_replayed_each(self, heads: Mapping[str, int]) -> None:
        """A replay covered each channel of ``heads`` up to its head: drop live frames
        it holds (for a backend that numbers each channel on its own)."""
        self._floors = heads

    def render(self, frames: list[Frame]) -> list[bytes]:
        """The bytes of ``frames`` as this stream writes them: shared as they are, or,
        with :attr:`positions`, each with the stream's id after it."""
        positions = self.positions
        if positions is None:
            return [f.data for f in frames]
        out = []
        for f in frames:
            data = f.data
            if not f.seq or not data.startswith(b"id: "):
                out.append(data)
                continue
            end = data.index(b"\n")
            own = data[4:end].decode()
            if not f.channel.startswith(CLIENT_CHANNEL_PREFIX):
                positions.advance(f.channel, f.seq)
            text = positions.text("" if own == str(f.seq) else own)
            out.append(b"id: " + text.encode() + data[end:])
        return out

    def _overflow(self, size: int) -> bool:
        """Apply the overflow policy; True when the new frame may still be queued."""
        policy = self.overflow_policy
        if policy == "drop_newest" or (policy == "drop_oldest" and size > self._limit):
            self._count_drop(1)
            return False
        if policy == "drop_oldest":
            buffer = self._buffer
            dropped = 0
            while dropped < len(buffer) and self.buffered_bytes + size > self._limit:
                self.buffered_bytes -= len(buffer[dropped].data)
                dropped += 1
            del buffer[:dropped]
            self._count_drop(dropped)
            return True
        if self.on_overflow is not None:
            self.on_overflow(self, 0)
        return False

    def _count_drop(self, count: int) -> None:
        self.dropped += count
        if self.on_overflow is not None:
            self.on_overflow(self, count)

    def take(self) -> tuple[bytes, int, float]:
        """Everything buffered, as one chunk; the number of events in it; and when
        the oldest of them arrived (``Frame.created``, 0 when not measured)."""
        buffer = self._buffer
        count = len(buffer)
        first = buffer[0]
        if first.seq:
            created = first.created
        else:
            count -= 1  # a heartbeat, only ever queued first into an empty buffer
            created = buffer[1].created if count else 0.0
        if self.positions is not None:
            chunk = b"".join(self.render(buffer))
        else:
            chunk = first.data if len(buffer) == 1 else b"".join([f.data for f in buffer])
        if buffer[-1].seq:
            self.taken_seq = buffer[-1].seq
        buffer.clear()
        self.buffered_bytes = 0
        return chunk, count, created

    def take_frames(self) -> list[Frame]:
        frames = list(self._buffer)
        self._buffer.clear()
        self.buffered_bytes = 0
        return frames

    @property
    def sending(self) -> bool:
        """Whether a write to this client is in progress (it waits for the client to read)."""
        return self.outlet is not None and self.outlet.sending

    def mark_closed(self, reason: str, *, discard: bool) -> None:
        if self.closed:
            if discard:
                self._discard()
            return
        self.closed = True
        self.close_reason = reason
        if discard:
            self._discard()
        elif self.outlet is not None:
            self.outlet.wake()

    def _discard(self) -> None:
        """Drop what is buffered and abandon a write in progress."""
        self._buffer.clear()
        self.buffered_bytes = 0
        if self.outlet is not None:
            self.outlet.abandon()


__all__ = ["DisconnectReason", "SSEClient"]
