"""The Lua scripts of the Redis backend: their sources, their registration, the packing
of a batch of publications into the publish script's arguments, and the parsing of
what the scripts store and announce.

The scripts live in ``lua/`` next to this module, read once at import. A script that
uses shared functions is sent as the shared files followed by its own.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from fastapi_sse.backends._redis_keys import Keys
from fastapi_sse.backends.base import Message, Publication

_LUA = files("fastapi_sse.backends").joinpath("lua")


def source(*names: str) -> str:
    """A script: the named files of ``lua/``, in order (shared functions first)."""
    return "".join(_LUA.joinpath(name + ".lua").read_text(encoding="utf-8") for name in names)


INIT = source("counter", "init")
PUBLISH = source("sweep", "counter", "id_index", "publish")
REPLAY = source("sweep", "replay")
CLAIM = source("claim")
PRESENCE_SCRIPTS = {
    "present": source("presence", "present"),
    "presence": source("presence", "presence_get"),
    "absent": source("presence", "absent"),
}
RUN_SCRIPTS = {
    "begin": source("sweep", "run_begin"),
    "renew": source("sweep", "run_renew"),
    "state": source("sweep", "run_state"),
    "cancel": source("run_cancel"),
    "end": source("run_end"),
}


class Scripts:
    """The backend's scripts registered on one client (run by hash, loaded when missing)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.init: AsyncScript = client.register_script(INIT)
        self.publish: AsyncScript = client.register_script(PUBLISH)
        self.replay: AsyncScript = client.register_script(REPLAY)


_HEADER = struct.Struct(">BHHHIHHI")
_LENGTH = struct.Struct(">H")
"""How the events of a script call are packed into one argument (see ``lua/publish.lua``)."""

_SCRIPT_EVENTS = 2000
_SCRIPT_BYTES = 2 * 2**20
"""At most this many events (and payload bytes) per call of the publish script: Redis
runs nothing else while a script runs (about 35 ms for 2,000 events here), and the
script unpacks two values per event into one command, under Lua's limit of 8,000."""

_NAMES_MAX = 50_000
"""Channels whose encoded names and routes are kept for the next publishes."""

Call = tuple[list[Any], list[Any]]
"""KEYS and ARGV of one script call."""


def chunks(publications: Sequence[Publication]) -> list[Sequence[Publication]]:
    """The batch cut into script calls (always the same cut for the same batch)."""
    cut: list[Sequence[Publication]] = []
    start = size = 0
    for i, p in enumerate(publications):
        if i > start and (i - start >= _SCRIPT_EVENTS or size + len(p.payload) > _SCRIPT_BYTES):
            cut.append(publications[start:i])
            start, size = i, 0
        size += len(p.payload)
    cut.append(publications[start:])
    return cut


class PublishCalls:
    """Builds the calls of the publish script for one backend's keys and settings."""

    def __init__(
        self, keys: Keys, *, history_size: int, history_ttl_ms: int, id_index_size: int, token_ttl_ms: int
    ) -> None:
        self._keys = keys
        self._fixed_keys = [
            keys.seq,
            keys.last,
            keys.live,
            keys.trim,
            keys.floor,
            keys.ids,
            keys.id_times,
            keys.dead,
        ]
        self._settings = [history_size, history_ttl_ms, id_index_size, token_ttl_ms]
        self._names: dict[str, tuple[bytes, bytes, str | None]] = {}

    def call(self, chunk: Sequence[Publication], token_prefix: str) -> Call:
        """KEYS and ARGV of one call; its token is named by ``token_prefix``, the
        chunk's first publication key and its length: the same chunk sent again has
        the same token."""
        keys: list[Any] = [*self._fixed_keys, self._keys.token(f"{token_prefix}{chunk[0].key}:{len(chunk)}")]
        args: list[Any] = [*self._settings, len(chunk), 0]
        positions: dict[str, int] = {}
        names = self._names
        parts: list[bytes] = []
        for p in chunk:
            channel = p.channel
            found = names.get(channel)
            if found is None:
                if len(names) >= _NAMES_MAX:
                    names.clear()
                route = self._keys.route(channel)
                found = names[channel] = (channel.encode(), route.encode(), self._keys.route_backlog(route))
            name, route_bytes, backlog = found
            position = 0
            if backlog is not None and not p.store:
                position = positions.get(backlog, 0)
                if not position:
                    keys.append(backlog)
                    position = positions[backlog] = len(keys)
            if p.event_id is None:
                header = _HEADER.pack(
                    p.store, position, len(name), 0, len(p.payload), len(route_bytes), 0, p.history or 0
                )
                parts += (header, name, p.payload, route_bytes)
                continue
            event_id = p.event_id.encode()
            # The channels the id resolves through (see Backend.publish), each once.
            indexed = [c.encode() for c in dict.fromkeys([channel, *p.index] if p.store else p.index)]
            header = _HEADER.pack(
                p.store,
                position,
                len(name),
                len(event_id),
                len(p.payload),
                len(route_bytes),
                len(indexed),
                p.history or 0,
            )
            parts += (header, name, event_id, p.payload, route_bytes)
            for c in indexed:
                parts += (_LENGTH.pack(len(c)), c)
        args += (b"".join(parts), self._keys.history_prefix)
        return keys, args


def forget_tokens(call: Call, tokens: list[str]) -> None:
    """Make a call also delete these token keys (of calls whose reply arrived)."""
    call[1][5] = len(tokens)
    call[0].extend(tokens)


def token_of(call: Call) -> str:
    """The token key of a call, to delete once its reply arrived."""
    token: str = call[0][8]
    return token


def send(client: redis.Redis, sha: str, calls: list[Call]) -> list[Any]:
    """Run publish script calls in one round trip, by hash; load the script once more
    if Redis lost it (calls that ran before are recognised by their tokens). Returns
    each call's first seq."""
    for attempt in range(2):
        try:
            if len(calls) == 1:
                keys, args = calls[0]
                return [client.evalsha(sha, len(keys), *keys, *args)]
            with client.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.evalsha(sha, len(keys), *keys, *args)
                return list(pipe.execute())
        except NoScriptError:
            if attempt:
                raise
            client.script_load(PUBLISH)
    raise AssertionError("unreachable")  # pragma: no cover


def parse_member(channel: str, member: bytes) -> Message:
    """A message from a history entry (see ``lua/publish.lua``)."""
    seq, _, rest = member.partition(b":")
    _, _, rest = rest.partition(b":")
    length, _, rest = rest.partition(b":")
    cut = int(length)
    return Message(int(seq), channel, rest[:cut].decode(), rest[cut:])


def parse_published(data: bytes) -> Message:
    """A message from what the publish script announces (and keeps in worker backlogs)."""
    seq, id_length, channel_length, rest = data.split(b"\n", 3)
    a, b = int(id_length), int(channel_length)
    event_id = rest[:a].decode()
    return Message(int(seq), rest[a : a + b].decode(), event_id or seq.decode(), rest[a + b :])
