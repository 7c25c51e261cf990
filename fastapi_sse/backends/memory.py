"""The in-process backend: history in memory, delivery by direct call."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Collection

from fastapi_sse.backends.base import Backend, Message, Replay, RunLedger, RunState, Sink

# Index entries kept apart from the history: ids of events for one client, and ids
# whose events are gone (each for one TTL).
_MAX_KEPT_IDS = 100_000

# The id index: (channel, id) -> [seq, or _REPEATED once the id came twice on the
# channel, count of the indexed events still held].
_REPEATED = -1

_EXPIRE_EVERY = 5.0
"""Seconds between two sweeps of expired history, at most (a replay expires what it reads)."""
_IdKey = tuple[str, str]


class _History:
    __slots__ = ("entries", "kept_until", "trimmed_upto")

    def __init__(self) -> None:
        self.entries: deque[tuple[float, Message]] = deque()
        self.trimmed_upto = 0
        # With history_size=0 nothing is stored; the channel's trim mark alone is kept
        # (until this monotonic time) so that a resume reports a gap, not nothing.
        self.kept_until = 0.0


class MemoryBackend(Backend):
    """Keeps the last ``history_size`` messages of each channel for ``history_ttl`` seconds."""

    def __init__(self, *, history_size: int = 1000, history_ttl: float = 3600.0) -> None:
        self._size = history_size
        self._ttl = history_ttl
        self._seq = 0
        self._sink: Sink | None = None
        self.runs = MemoryRunLedger()
        self._expiry: asyncio.TimerHandle | None = None
        self._history: dict[str, _History] = {}
        self._ids: dict[_IdKey, list[int]] = {}
        # Index entries none of whose events is held any more, kept for one TTL as
        # repeated, so that an id used again on a channel is not taken for the old one.
        self._spent_ids: OrderedDict[_IdKey, float] = OrderedDict()
        # Highest seq of any channel whose history was dropped whole; a cursor older
        # than this may have missed events on a channel we no longer know.
        self._forgotten_upto = 0
        # Channels whose history was dropped whole keep their own trim mark for one
        # more TTL (channel -> (drop time, mark)), so they stay exact if used again.
        self._marks: dict[str, tuple[float, int]] = {}
        # Index keys of caller ids of events kept out of history (send_to), oldest
        # first, so a client resuming from one resumes exactly; they expire with the TTL.
        self._loose_ids: deque[tuple[float, tuple[_IdKey, ...]]] = deque()

    async def start(self, sink: Sink) -> None:
        self._sink = sink
        self._schedule_expiry(asyncio.get_running_loop())

    async def close(self) -> None:
        self._sink = None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _schedule_expiry(self, loop: asyncio.AbstractEventLoop) -> None:
        def tick() -> None:
            self.expire()
            self._schedule_expiry(loop)

        self._expiry = loop.call_later(max(0.05, min(_EXPIRE_EVERY, self._ttl / 4)), tick)

    async def listen(self, channels: Collection[str]) -> None:
        return None

    async def unlisten(self, channels: Collection[str]) -> None:
        return None

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
        return self.publish_nowait(channel, payload, event_id, store=store, index=index, history=history)

    def publish_nowait(
        self,
        channel: str,
        payload: bytes,
        event_id: str | None,
        *,
        store: bool,
        index: Collection[str] = (),
        history: int | None = None,
    ) -> Message:
        self._seq += 1
        message = Message(self._seq, channel, event_id or str(self._seq), payload)
        if store:
            log = self._history.get(channel)
            if log is None:
                log = self._history[channel] = _History()
                if self._marks:
                    log.trimmed_upto = self._marks.pop(channel, (0.0, 0))[1]
            cap = self._size if history is None else history
            if cap:
                log.entries.append((time.monotonic(), message))
                if event_id is not None:
                    self._index((channel, event_id), message.seq)
                if len(log.entries) > cap:
                    self._drop_oldest(log)
            else:
                log.trimmed_upto = message.seq
                log.kept_until = time.monotonic() + self._ttl
        if event_id is not None and index:
            # The channel itself is indexed with the history, which unindexes it.
            stored = store and (self._size if history is None else history) > 0
            keys = tuple((c, event_id) for c in dict.fromkeys(index) if not (stored and c == channel))
            for key in keys:
                self._index(key, message.seq)
            if keys:
                self._loose_ids.append((time.monotonic(), keys))
                if len(self._loose_ids) > _MAX_KEPT_IDS:
                    self._forget_loose_id()
        if self._sink is not None:
            self._sink.deliver(message)
        return message

    async def head(self) -> int:
        return self._seq

    async def resolve(self, event_id: str, channels: Collection[str]) -> int | None:
        found = {entry[0] for c in channels if (entry := self._ids.get((c, event_id))) is not None}
        if found:
            # One message among the client's channels, else unknown (see Backend.resolve).
            return found.pop() if len(found) == 1 and _REPEATED not in found else None
        if event_id.isascii() and event_id.isdigit():
            value = int(event_id)
            return value if value <= self._seq else None
        return None

    async def replay(self, channels: Collection[str], after: int | None) -> Replay:
        deadline = time.monotonic() - self._ttl
        for channel in channels:
            self._expire(channel, deadline)
        if after is None:
            return Replay((), self._seq, frozenset(channels))
        found: list[Message] = []
        gaps = set()
        for channel in channels:
            history = self._history.get(channel)
            if history is None:
                mark = self._marks.get(channel)
                if after < (mark[1] if mark else self._forgotten_upto):
                    gaps.add(channel)
                continue
            if history.trimmed_upto > after:
                gaps.add(channel)
                continue
            # Entries are in seq order: walk back from the newest.
            for _, message in reversed(history.entries):
                if message.seq <= after:
                    break
                found.append(message)
        found.sort(key=lambda m: m.seq)
        return Replay(found, self._seq, frozenset(gaps))

    def expire(self) -> None:
        """Drop messages older than the history TTL, and channels left empty."""
        deadline = time.monotonic() - self._ttl
        for channel in list(self._history):
            self._expire(channel, deadline)
        for channel, (dropped, _) in list(self._marks.items()):
            if dropped < deadline:
                del self._marks[channel]
        while self._loose_ids and self._loose_ids[0][0] < deadline:
            self._forget_loose_id()
        while self._spent_ids and next(iter(self._spent_ids.values())) < deadline:
            self._drop_spent_id()

    def _index(self, key: _IdKey, seq: int) -> None:
        entry = self._ids.get(key)
        if entry is None:
            self._ids[key] = [seq, 1]
            return
        entry[0] = _REPEATED
        entry[1] += 1
        self._spent_ids.pop(key, None)

    def _unindex(self, key: _IdKey) -> None:
        entry = self._ids[key]
        entry[1] -= 1
        if entry[1] == 0:
            entry[0] = _REPEATED
            self._spent_ids[key] = time.monotonic()
            if len(self._spent_ids) > _MAX_KEPT_IDS:
                self._drop_spent_id()

    def _drop_spent_id(self) -> None:
        key, _ = self._spent_ids.popitem(last=False)
        del self._ids[key]

    def _forget_loose_id(self) -> None:
        _, keys = self._loose_ids.popleft()
        for key in keys:
            self._unindex(key)

    def _expire(self, channel: str, deadline: float) -> None:
        history = self._history.get(channel)
        if history is None:
            return
        while history.entries and history.entries[0][0] < deadline:
            self._drop_oldest(history)
        if not history.entries and history.kept_until <= time.monotonic():
            self._forgotten_upto = max(self._forgotten_upto, history.trimmed_upto)
            self._marks[channel] = (time.monotonic(), history.trimmed_upto)
            del self._history[channel]

    def _drop_oldest(self, history: _History) -> None:
        _, message = history.entries.popleft()
        history.trimmed_upto = message.seq
        if message.id != str(message.seq):
            self._unindex((message.channel, message.id))


class _Run:
    __slots__ = ("cancelled", "ended", "expires", "first", "lease_until", "owner")

    def __init__(self, owner: str, lease_until: float, expires: float, first: int = 0) -> None:
        self.owner = owner
        self.first = first
        self.lease_until = lease_until
        self.expires = expires
        self.ended = False
        self.cancelled = False


class MemoryRunLedger(RunLedger):
    """Runs' state in this process: for one worker, or a backend that keeps none."""

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}

    def _get(self, run_id: str) -> _Run | None:
        run = self._runs.get(run_id)
        if run is not None and run.expires <= time.monotonic():
            del self._runs[run_id]
            return None
        return run

    async def begin(self, run_id: str, owner: str, *, first: int, lease: float, retain: float) -> bool:
        if self._get(run_id) is not None:
            return False
        now = time.monotonic()
        # Retained while it runs: the lease's renewals push the end of retention too.
        self._runs[run_id] = _Run(owner, now + lease, now + lease + retain, first)
        return True

    async def renew(self, run_id: str, owner: str, *, lease: float) -> RunState | None:
        run = self._get(run_id)
        if run is None:
            return None
        now = time.monotonic()
        if run.owner == owner and not run.ended:
            run.lease_until = now + lease
            run.expires = max(run.expires, now + lease)
        return self._state(run, now)

    async def cancel(self, run_id: str) -> bool:
        run = self._get(run_id)
        if run is None or run.ended:
            return False
        run.cancelled = True
        return True

    async def end(self, run_id: str, *, retain: float) -> bool:
        run = self._get(run_id)
        now = time.monotonic()
        if run is None:
            run = self._runs[run_id] = _Run("", now, now + retain)
        elif run.ended:
            return False
        run.ended = True
        run.lease_until = now
        run.expires = now + retain
        return True

    async def state(self, run_id: str) -> RunState | None:
        run = self._get(run_id)
        return None if run is None else self._state(run, time.monotonic())

    @staticmethod
    def _state(run: _Run, now: float) -> RunState:
        live = not run.ended and run.lease_until > now
        return RunState(live=live, ended=run.ended, cancelled=run.cancelled, first=run.first)


__all__ = ["MemoryBackend", "MemoryRunLedger"]
