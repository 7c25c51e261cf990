"""A stream's position on each of its channels, carried in its event ids.

A backend that numbers each channel on its own (a Redis Cluster: see
:attr:`Backend.ordered <fastapi_sse.backends.base.Backend.ordered>`) has no one
number a ``Last-Event-ID`` could name. There, every id a stream writes says where
the stream is on each of its channels: ``p:`` then, for each channel, four base-36
characters naming it (a hash of its name) and its sequence number in hexadecimal,
separated by ``.``; the publisher's own id, if any, follows after ``~``. A resume
reads every channel from its own position, so it is exact whatever slots the
channels live in.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi_sse.backends.base import Backend

PREFIX = "p:"
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_TAG_SPACE = 36**4
_tags: dict[str, str] = {}


def _base36(value: int) -> str:
    if value <= 0:
        return "0"
    digits = []
    while value:
        value, rest = divmod(value, 36)
        digits.append(_DIGITS[rest])
    return "".join(reversed(digits))


def tag(channel: str) -> str:
    """The four characters that name a channel in an id."""
    found = _tags.get(channel)
    if found is None:
        if len(_tags) > 100_000:
            _tags.clear()
        found = _tags[channel] = _base36(zlib.crc32(channel.encode()) % _TAG_SPACE + _TAG_SPACE)[1:]
    return found


class Positions:
    """Where one stream is on each channel, and the id that says so, kept up to date
    one channel at a time (a stream writes an id with every event)."""

    __slots__ = ("_order", "_parts", "_seqs", "_text")

    def __init__(self) -> None:
        self._seqs: dict[str, int] = {}
        self._parts: dict[str, str] = {}
        self._order: list[str] = []
        self._text: str | None = None

    def get(self, channel: str) -> int:
        return self._seqs.get(channel, 0)

    def advance(self, channel: str, seq: int) -> None:
        """The stream is at ``seq`` on ``channel``, unless it is further already."""
        if seq <= self._seqs.get(channel, -1):
            return
        if channel not in self._seqs:
            bisect.insort(self._order, channel)
        self._seqs[channel] = seq
        self._parts[channel] = tag(channel) + format(seq, "x")
        self._text = None

    def advance_all(self, seqs: Mapping[str, int]) -> None:
        for channel, seq in seqs.items():
            self.advance(channel, seq)

    def text(self, own_id: str = "") -> str:
        """The id; the publisher's own id ``own_id`` follows after ``~``."""
        text = self._text
        if text is None:
            parts = self._parts
            text = self._text = PREFIX + ".".join([parts[c] for c in self._order])
        return text + "~" + own_id if own_id else text


def encode(positions: Mapping[str, int], own_id: str = "") -> str:
    """The id of a stream at ``positions`` (channel -> sequence number)."""
    found = Positions()
    found.advance_all(positions)
    return found.text(own_id)


def longest(channels: int, own_id: int) -> int:
    """The longest id of a stream on ``channels`` channels whose publishers' ids are
    up to ``own_id`` characters."""
    return len(PREFIX) + channels * (4 + 16 + 1) + 1 + own_id


def decode(event_id: str, channels: Collection[str]) -> dict[str, int] | None:
    """Each of ``channels``' position in a stream's id; None when the id is no such id.
    A channel the id does not name (the stream did not read it then) starts from the
    oldest position the id holds."""
    if not event_id.startswith(PREFIX):
        return None
    named: dict[str, int] = {}
    for part in event_id[len(PREFIX) :].partition("~")[0].split("."):
        if len(part) < 5:
            return None
        try:
            named[part[:4]] = int(part[4:], 16)
        except ValueError:
            return None
    if not named:
        return None
    oldest = min(named.values())
    return {c: named.get(tag(c), oldest) for c in channels}


async def cursor_at(backend: Backend, channels: Collection[str]) -> str:
    """An id that puts a stream on ``channels`` where they are now."""
    if backend.ordered:
        return str(await backend.head())
    return encode(await backend.heads(channels))


async def cursors_of(backend: Backend, event_id: str, channels: Collection[str]) -> dict[str, int] | None:
    """Where a stream resuming from ``event_id`` is on each of ``channels``; None when
    the id is unknown to them."""
    if not backend.ordered:
        found = decode(event_id, channels)
        if found is not None:
            return found
    after = await backend.resolve(event_id, channels)
    return None if after is None else dict.fromkeys(channels, after)


__all__: list[str] = []  # internal: the service's streams use it
