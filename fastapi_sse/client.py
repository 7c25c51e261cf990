"""One connected client: its channels and its bounded buffer of unsent bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextvars import Context
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import Send

    from fastapi_sse.settings import OverflowPolicy
    from fastapi_sse.writer import Handoff


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
    REFUSED = "refused"
    """Refused for load, a limit or shutdown: told to come back later (``retry:``)."""


class SSEClient:
    """A client of the service, as ``add_client`` returns it.

    ``channels`` lists the channels it is subscribed to; send to it with
    ``send_to(client.id, ...)``. Its buffer is bounded in bytes; what happens when
    it fills is the ``overflow_policy`` setting.
    """

    __slots__ = (
        "_buffer",
        "_buffered",
        "_cancelled",
        "_context",
        "_floor",
        "_handoff",
        "_limit",
        "_on_ready",
        "_parked",
        "_policy",
        "_queued",
        "_replayed",
        "_send",
        "_task",
        "_woken",
        "attached",
        "channels",
        "close_reason",
        "closed",
        "created_at",
        "dropped",
        "id",
        "identity",
        "last_event_id",
        "last_write",
        "on_overflow",
        "sending",
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
        self.closed = False
        self.close_reason: str | None = None
        self.sending = False
        self.last_write = 0.0
        self.dropped = 0
        self._buffer: list[Frame] = []
        self._buffered = 0
        self._limit = buffer_limit
        self._policy = policy
        self._task: asyncio.Task[None] | None = None
        # True once mark_closed cancelled the stream's task (see SSEResponse).
        self._cancelled = False
        # During a resume, live events up to the replayed head on the replayed
        # channels are already in the replay: skip them.
        self._floor = 0
        self._replayed = _NO_CHANNELS
        # Set by the service: called with the number of frames dropped, 0 meaning
        # "disconnect this client".
        self.on_overflow: Callable[[SSEClient, int], None] | None = None
        # Set by the response: while the stream's task is parked (nothing left to
        # write, waiting in the ASGI ``receive`` for the disconnect), ``push`` hands
        # the client to the service's writer, which calls ``_send`` in ``_context``;
        # a send it cannot finish becomes ``_handoff``. ``wake`` ends the park by
        # cancelling that wait, and sets ``_woken`` so the stream knows it was ours.
        self._parked = False
        self._woken = False
        self._queued = False
        self._on_ready: Callable[[SSEClient], None] | None = None
        self._send: Send | None = None
        self._context: Context | None = None
        self._handoff: Handoff | None = None

    def __repr__(self) -> str:
        return f"SSEClient(id={self.id!r}, channels={sorted(self.channels)!r})"

    def push(self, frame: Frame) -> None:
        """Queue a frame for this client; never blocks."""
        if self.closed:
            return
        if frame.seq <= self._floor and frame.channel in self._replayed:
            return
        size = len(frame.data)
        if self._buffered + size > self._limit and not self._overflow(size):
            return
        self._buffer.append(frame)
        self._buffered += size
        # An unparked stream's task is running its loop and takes the buffer itself.
        if self._parked and not self._queued and self._on_ready is not None:
            self._queued = True
            self._on_ready(self)

    def _overflow(self, size: int) -> bool:
        """Apply the overflow policy; True when the new frame may still be queued."""
        policy = self._policy
        if policy == "drop_newest" or (policy == "drop_oldest" and size > self._limit):
            self._count_drop(1)
            return False
        if policy == "drop_oldest":
            buffer = self._buffer
            dropped = 0
            while dropped < len(buffer) and self._buffered + size > self._limit:
                self._buffered -= len(buffer[dropped].data)
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
        chunk = first.data if len(buffer) == 1 else b"".join([f.data for f in buffer])
        buffer.clear()
        self._buffered = 0
        return chunk, count, created

    def take_frames(self) -> list[Frame]:
        frames = list(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        return frames

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    def wake(self) -> None:
        """End the stream's park, if it is parked: cancel its wait in ``receive``."""
        if self._parked:
            self._parked = False
            if self._task is not None:
                self._woken = True
                self._task.cancel()

    def mark_closed(self, reason: str, *, discard: bool) -> None:
        if self.closed:
            if discard:
                self._discard()
            return
        self.closed = True
        self.close_reason = reason
        if discard:
            self._discard()
        self.wake()

    def _discard(self) -> None:
        """Drop what is buffered and abandon a write in progress."""
        self._buffer.clear()
        self._buffered = 0
        if self._handoff is not None:
            # A send the writer left half-done for the stream's task, which has not
            # resumed yet: the client is gone, drop it.
            self._handoff.close()
            self._handoff = None
        # A writer stuck in a send to a client that stopped reading would wait for
        # ever: cancel it.
        if self.sending and self._task is not None and not self._cancelled:
            self._cancelled = True
            self._task.cancel()
        self.wake()
