"""The Redis Cluster backend: channels sharded over the masters of a cluster.

Each channel's history, sequence and shard channel share one hash tag, so one Lua
script stores and announces its events (``SPUBLISH``) atomically on the master that
owns the slot. There is no sequence across channels, which would put every publish
on one master: each channel numbers its own events (the server's time in
microseconds, or one more than the channel's last, so numbers keep increasing past a
failover and past a history that expired whole). A stream's ``Last-Event-ID`` then
carries its position on each of its channels (see ``fastapi_sse._positions``), and a
resume is exact on every channel, whatever slots they live in.

Workers, capped groups, presence and runs live under one tag of their own: they are
not on the path of every event.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from fastapi_sse.backends._cluster_connection import open_cluster
from fastapi_sse.backends._cluster_keys import ClusterKeys
from fastapi_sse.backends._cluster_listener import ShardListener
from fastapi_sse.backends._redis_connection import redact
from fastapi_sse.backends._redis_coordination import RedisCoordination
from fastapi_sse.backends._redis_keys import Keys
from fastapi_sse.backends._redis_runs import RedisRunLedger
from fastapi_sse.backends._redis_scripts import parse_member, source
from fastapi_sse.backends.base import Backend, Message, Publication, Replay, Sink
from fastapi_sse.errors import BackendError

if TYPE_CHECKING:
    from fastapi_sse.settings import SSESettings

PUBLISH = source("cluster_publish")
REPLAY = source("cluster_replay")
REPAIR = source("cluster_repair")

_HEADER = struct.Struct(">BHHIHI")
"""How each event of a script call is packed (see ``lua/cluster_publish.lua``)."""
_MARGIN_US = 1_000_000
"""How far before "now minus the history TTL" a channel without history counts as
complete: more than a channel's numbers can run ahead of the clock."""
_CALL_EVENTS = 2000  # events per script call at most: Redis runs nothing else meanwhile


class RedisClusterBackend(Backend):
    """Channels, history and workers shared over a Redis Cluster (Redis 7 or newer,
    for sharded pub/sub). ``url`` is any node of the cluster; the others are found
    from it. Build it with :meth:`from_settings` (``SSE_BACKEND=redis-cluster``)."""

    remote = True
    ordered = False

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "sse:",
        history_size: int = 1000,
        history_ttl: float = 3600.0,
        timeout: float = 5.0,
        max_connections: int = 50,
        max_backoff: float = 5.0,
        health_interval: float = 5.0,
    ) -> None:
        self.url = url
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.timeout = timeout
        self.max_connections = max_connections
        self._keys = ClusterKeys(key_prefix)
        self._ttl_ms = round(history_ttl * 1000)
        self._token_ttl_ms = round(max(history_ttl, 2 * timeout + 1) * 1000)
        self._cluster: RedisCluster | None = None
        self._scripts: dict[str, AsyncScript] = {}
        shared = Keys(self._keys.shared)
        self.coordination = self._coordination = RedisCoordination(shared, redact(url))
        self.runs = self._runs = RedisRunLedger(self._keys.shared, redact(url))
        self._listener = ShardListener(
            self._keys,
            where=redact(url),
            history_size=history_size,
            timeout=timeout,
            health_interval=health_interval,
            max_backoff=max_backoff,
            replay=self.replay_each,
            repair=self._repair,
            heads=self.heads,
        )
        self._token_prefix = ""
        self._acknowledged: dict[str, list[str]] = {}
        self._slots = asyncio.Semaphore(max_connections)

    @classmethod
    def from_settings(cls, settings: SSESettings) -> RedisClusterBackend:
        """A backend configured by ``SSE_REDIS_*`` and the history settings."""
        return cls(
            settings.redis_url,
            key_prefix=settings.redis_key_prefix,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            timeout=settings.redis_timeout,
            max_connections=settings.redis_max_connections,
            max_backoff=settings.redis_max_backoff,
            health_interval=settings.redis_health_interval,
        )

    @property
    def errors(self) -> int:
        """Losses of shard subscription connections (see :attr:`Backend.errors`)."""
        return self._listener.errors

    @errors.setter
    def errors(self, value: int) -> None:
        self._listener.errors = value

    @property
    def reconnects(self) -> int:
        return self._listener.reconnects

    @reconnects.setter
    def reconnects(self, value: int) -> None:
        self._listener.reconnects = value

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, sink: Sink) -> None:
        """Reach the cluster, read its slot map and check it (Redis 7, scripting);
        raises :class:`BackendError` saying what to fix."""
        cluster = await open_cluster(self.url, max_connections=self.max_connections, socket_timeout=self.timeout)
        self._cluster = cluster
        self._scripts = {
            "publish": cluster.register_script(PUBLISH),
            "replay": cluster.register_script(REPLAY),
            "repair": cluster.register_script(REPAIR),
        }
        self._token_prefix = uuid.uuid4().hex[:12] + ":"
        # The shared keys (workers, groups, runs) go through the cluster client too.
        client: aioredis.Redis = cluster  # type: ignore[assignment]
        self._coordination.attach(client)
        self._runs.attach(client)
        self._listener.start(cluster, sink)

    async def close(self) -> None:
        await self._listener.stop()
        self._listener.detach()
        if self._cluster is not None:
            await self._cluster.aclose()
            self._cluster = None
            self._coordination.detach()
            self._runs.detach()

    def _client(self) -> RedisCluster:
        if self._cluster is None:
            raise BackendError("the redis-cluster backend is not started")
        return self._cluster

    # -- subscriptions -----------------------------------------------------------------

    async def listen(self, channels: Collection[str]) -> None:
        self._client()
        await self._listener.listen(channels)

    async def unlisten(self, channels: Collection[str]) -> None:
        await self._listener.unlisten(channels)

    # -- publishing -----------------------------------------------------------------------

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
        return (await self.publish_many([Publication(channel, payload, event_id, store, index, history)]))[0]

    async def publish_many(self, publications: Sequence[Publication]) -> list[Message]:
        """Store and announce a batch: one script call per tag (and per 2,000 events),
        the calls to different masters at once. In order on each channel; a call sent
        again with the same publication keys after a failure is not stored twice."""
        self._client()
        if not publications:
            return []
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(publications):
            groups.setdefault(self._keys.tag(p.channel), []).append(i)
        calls = []
        for tag, indexes in groups.items():
            for start in range(0, len(indexes), _CALL_EVENTS):
                calls.append((tag, indexes[start : start + _CALL_EVENTS]))
        tokens = [
            self._keys.token(tag, f"{self._token_prefix}{publications[part[0]].key}:{len(part)}") for tag, part in calls
        ]
        forgets = {tag: self._acknowledged.pop(tag, []) for tag in groups}
        replies = await asyncio.gather(
            *(
                self._call(tag, [publications[i] for i in part], token, forgets.pop(tag, []))
                for (tag, part), token in zip(calls, tokens, strict=True)
            ),
            return_exceptions=True,
        )
        failed = next((r for r in replies if isinstance(r, BaseException)), None)
        if failed is not None:
            # Nothing is acknowledged: a call that ran keeps its token, so that the batch
            # sent again is not stored twice where it was stored already.
            raise BackendError(
                f"could not publish to channel {publications[0].channel!r} on the Redis Cluster at "
                f"{redact(self.url)}: {failed or type(failed).__name__}"
            ) from failed
        for (tag, _), token in zip(calls, tokens, strict=True):
            done = self._acknowledged.setdefault(tag, [])
            if len(done) < 64:
                done.append(token)
        messages: list[Message | None] = [None] * len(publications)
        for (_, part), seqs in zip(calls, cast("list[list[int]]", replies), strict=True):
            for i, seq in zip(part, seqs, strict=True):
                p = publications[i]
                messages[i] = Message(seq, p.channel, p.event_id or str(seq), p.payload)
        return [m for m in messages if m is not None]

    async def _call(self, tag: str, chunk: list[Publication], token: str, forget: list[str]) -> list[int]:
        """One call of the publish script (it also deletes the token keys ``forget``)."""
        parts: list[bytes] = []
        route = self._keys.base(tag).encode()
        for p in chunk:
            name = p.channel.encode()
            event_id = (p.event_id or "").encode()
            header = _pack(p.store, len(name), len(event_id), len(p.payload), len(route), p.history or 0)
            parts += (header, name, event_id, p.payload, route)
        args: list[Any] = [
            self.history_size,
            self._ttl_ms,
            self._token_ttl_ms,
            len(chunk),
            b"".join(parts),
            len(forget),
            self._keys.base(tag),
            _MARGIN_US,
        ]
        try:
            reply = await self._limited("publish", [token, *forget], args)
        except BaseException:
            if forget:
                # Maybe not deleted: the next call deletes them.
                self._acknowledged.setdefault(tag, []).extend(forget)
            raise
        return [int(s) for s in reply.split(b",")]

    async def _limited(self, name: str, keys: list[Any], args: list[Any]) -> Any:
        """A script call on one of at most ``max_connections`` connections at once; a
        caller beyond waits up to ``timeout`` for one, as on one Redis."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise BackendError(
                f"all {self.max_connections} connections to the Redis Cluster are busy (SSE_REDIS_MAX_CONNECTIONS)"
            ) from None
        try:
            return await self._scripts[name](keys, args)
        finally:
            self._slots.release()

    # -- history ----------------------------------------------------------------------------

    async def head(self) -> int:
        """0: there is no sequence across channels (see :meth:`heads`)."""
        self._client()
        return 0

    async def heads(self, channels: Collection[str]) -> dict[str, int]:
        """Each channel's position now: an event stored from now on comes after it (for
        a channel this worker listens to, what it has received so far)."""
        known = {c: p for c in channels if (p := self._listener.position(c)) is not None}
        rest = [c for c in channels if c not in known]
        if rest:
            replay = await self.replay_each(dict.fromkeys(rest, 0), entries=False)
            known.update(replay.heads or {})
        return known

    async def resolve(self, event_id: str, channels: Collection[str]) -> int | None:
        """A decimal id is a position on the channel: one channel resumes from it.
        Positions across channels travel in the stream's id (``_positions``)."""
        if event_id.isascii() and event_id.isdigit():
            return int(event_id)
        return None

    async def replay(self, channels: Collection[str], after: int | None) -> Replay:
        """What history holds after ``after`` on each channel (a position on each: see
        :meth:`replay_each`)."""
        names = list(dict.fromkeys(channels))
        if after is None:
            heads = await self.heads(names)
            return Replay((), max(heads.values(), default=0), frozenset(names), heads=heads)
        return await self.replay_each(dict.fromkeys(names, after))

    async def replay_each(self, cursors: Mapping[str, int], *, entries: bool = True) -> Replay:
        """What each channel's history holds after its own cursor."""
        names, prefix = list(cursors), self._keys
        self._client()

        async def one(channel: str) -> Any:
            cursor = cursors[channel] if entries else 2**62
            base = prefix.base(prefix.tag(channel))
            return await self._limited(
                "replay", [prefix.history(channel)], [cursor, base, channel, self._ttl_ms, _MARGIN_US]
            )

        try:
            replies = await asyncio.gather(*(one(c) for c in names))
        except (RedisError, OSError) as exc:
            raise BackendError(
                f"could not read history from the Redis Cluster at {redact(self.url)}: {exc or type(exc).__name__}"
            ) from exc
        messages: list[Message] = []
        gaps: set[str] = set()
        heads: dict[str, int] = {}
        floors: dict[str, int] = {}
        for channel, (head, floor, found) in zip(names, replies, strict=True):
            heads[channel], floors[channel] = int(head), int(floor)
            if entries and floors[channel] > cursors[channel]:
                gaps.add(channel)
            messages.extend(parse_member(channel, m) for m in found)
        messages.sort(key=lambda m: m.seq)
        return Replay(messages, max(heads.values(), default=0), frozenset(gaps), floors, heads=heads)

    async def _repair(self, tag: str, seen: int, channels: list[str]) -> bool:
        args = [self._keys.base(tag), seen, self._ttl_ms, *channels]
        return bool(int(await self._limited("repair", [self._keys.sequence(tag)], args)))


def _pack(*values: int) -> bytes:
    return _HEADER.pack(*values)


__all__ = ["RedisClusterBackend"]
