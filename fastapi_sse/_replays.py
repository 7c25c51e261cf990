"""History reads shared by the streams that resume at the same time.

When many browsers reconnect at once (a worker restarted, a deploy), each would read
the history of its channels from the shared backend, mostly the same channels. Here a
worker has at most one history read in flight: the resumes that arrive meanwhile
wait for it and then share the next read, of the union of their channels from the
oldest of their cursors, which each narrows to its own channels and cursor. A resume
alone waits for nothing; a storm of them costs a few reads, not one each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping

from fastapi_sse.backends.base import Backend, Replay

_Request = tuple[frozenset[str], int, "asyncio.Future[Replay]"]


class SharedReplays:
    """Reads history for the resuming streams of a worker, one read in flight at a time."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._waiting: list[_Request] = []
        self._reader: asyncio.Task[None] | None = None
        self._waiting_each: list[tuple[dict[str, int], asyncio.Future[Replay]]] = []
        self._reader_each: asyncio.Task[None] | None = None
        self.reads = 0
        """History reads made, each for one or more resuming streams."""

    async def replay(self, channels: Collection[str], after: int | None) -> Replay:
        """What :meth:`Backend.replay` answers, read together with other resumes."""
        if after is None:
            return Replay((), await self._backend.head(), frozenset(channels))
        future: asyncio.Future[Replay] = asyncio.get_running_loop().create_future()
        self._waiting.append((frozenset(channels), after, future))
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        return await future

    async def replay_each(self, cursors: Mapping[str, int]) -> Replay:
        """What :meth:`Backend.replay_each` answers, read together with other resumes
        (for a backend that numbers each channel on its own)."""
        future: asyncio.Future[Replay] = asyncio.get_running_loop().create_future()
        self._waiting_each.append((dict(cursors), future))
        if self._reader_each is None:
            self._reader_each = asyncio.get_running_loop().create_task(self._read_each())
        return await future

    async def _read_each(self) -> None:
        try:
            while self._waiting_each:
                batch, self._waiting_each = self._waiting_each, []
                lowest: dict[str, int] = {}
                for cursors, _ in batch:
                    for channel, after in cursors.items():
                        lowest[channel] = min(lowest.get(channel, after), after)
                try:
                    self.reads += 1
                    shared: Replay | None = await self._backend.replay_each(lowest)
                except Exception as exc:
                    shared, error = None, exc
                for cursors, future in batch:
                    if future.done():
                        continue
                    mine = None if shared is None else narrow_each(shared, cursors, lowest)
                    try:
                        if shared is None:
                            raise error
                        if mine is None:
                            self.reads += 1
                            mine = await self._backend.replay_each(cursors)
                    except Exception as exc:
                        future.set_exception(exc)
                        continue
                    future.set_result(mine)
        finally:
            self._reader_each = None

    async def _read(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                await self._answer(batch)
        finally:
            self._reader = None

    async def _answer(self, batch: list[_Request]) -> None:
        lowest = min(after for _, after, _ in batch)
        try:
            shared = await self._read_once(frozenset().union(*(c for c, _, _ in batch)), lowest)
        except Exception as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for channels, after, future in batch:
            if future.done():
                continue
            mine = narrow(shared, channels, after, lowest)
            if mine is None:
                # A channel trimmed between the shared cursor and this one: the shared
                # read left it out, so this stream reads on its own.
                try:
                    mine = await self._read_once(channels, after)
                except Exception as exc:
                    future.set_exception(exc)
                    continue
            future.set_result(mine)

    async def _read_once(self, channels: frozenset[str], after: int) -> Replay:
        self.reads += 1
        return await self._backend.replay(channels, after)


def narrow(shared: Replay, channels: frozenset[str], after: int, lowest: int) -> Replay | None:
    """A read made after ``lowest``, as one stream resuming on ``channels`` after
    ``after`` sees it; None when the read cannot tell (the stream needs its own)."""
    gaps = shared.gaps & channels
    if gaps and after != lowest:
        # A gap at the shared cursor is one at this later cursor only if its history
        # starts after this cursor too.
        floors = shared.floors
        if floors is None or any(floors.get(c, after + 1) <= after for c in gaps):
            return None
    messages = [m for m in shared.messages if m.seq > after and m.channel in channels]
    return Replay(messages, shared.head, gaps)


def narrow_each(shared: Replay, cursors: Mapping[str, int], lowest: Mapping[str, int]) -> Replay | None:
    """:func:`narrow` for a cursor on each channel."""
    gaps = shared.gaps & cursors.keys()
    floors = shared.floors
    for channel in gaps:
        if cursors[channel] != lowest[channel] and (floors is None or floors.get(channel, 0) <= cursors[channel]):
            return None
    messages = [m for m in shared.messages if m.channel in cursors and m.seq > cursors[m.channel]]
    heads = None if shared.heads is None else {c: shared.heads[c] for c in cursors}
    return Replay(messages, shared.head, frozenset(gaps), floors, heads=heads)


__all__: list[str] = []  # internal: the service uses it
