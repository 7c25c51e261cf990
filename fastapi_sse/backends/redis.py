"""The Redis backend: many workers on many hosts share channels, ids and history.

One ``INCR`` counter numbers every event, so ids increase across channels and
workers. Storing an event in its channel's history and announcing it with
``PUBLISH`` happen in one Lua script, so a client resuming on any worker never sees
live an event that history lacks, or the reverse. Each worker holds one
subscription connection (a ``PUBLISH`` per channel reaches only the workers whose
clients listen to it) and publishes through a connection pool.

When the subscription connection is lost, the worker reconnects with backoff,
subscribes again, and reads from history what its channels missed before it lets
live messages through again; what history lost is reported to the service, which
closes those channels' clients so that they resume and receive the ``gap`` event.

This module is the transport; its parts are internal modules next to it:
``_redis_connection`` (opening connections, checking the server), ``_redis_keys``
(the names of keys and pubsub channels), ``_redis_scripts`` (the Lua scripts in
``lua/`` and their arguments), ``_redis_listener`` (the subscription connection) and
``_redis_coordination`` (workers and capped groups).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from fastapi_sse.backends._redis_connection import (
    MIN_REDIS_VERSION,
    check_server,
    close_clients,
    open_clients,
    open_publishing_pool,
    redact,
)
from fastapi_sse.backends._redis_coordination import RedisCoordination
from fastapi_sse.backends._redis_keys import Keys
from fastapi_sse.backends._redis_listener import Listener
from fastapi_sse.backends._redis_runs import RedisRunLedger
from fastapi_sse.backends._redis_scripts import (
    Call,
    PublishCalls,
    Scripts,
    chunks,
    forget_tokens,
    parse_member,
    send,
    token_of,
)
from fastapi_sse.backends.base import Backend, Message, Publication, Replay, Sink
from fastapi_sse.errors import BackendError

if TYPE_CHECKING:
    from fastapi_sse.settings import SSESettings

_INLINE_EVENTS = 64
"""Batches up to this size are sent from the event loop; larger ones from a thread."""

_FORGET_MAX = 10_000
"""Token keys remembered for deletion; beyond, they expire on their own."""


class RedisBackend(Backend):
    """Channels, ids and history shared by every worker connected to one Redis.

    Build it with :meth:`from_settings` (``SSE_BACKEND=redis`` does it for you).
    Every key and channel starts with ``key_prefix``, so several services (or test
    runs) can share one Redis.
    """

    remote = True

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "sse:",
        history_size: int = 1000,
        history_ttl: float = 3600.0,
        id_index_size: int = 100_000,
        timeout: float = 5.0,
        max_connections: int = 50,
        max_backoff: float = 5.0,
        health_interval: float = 5.0,
    ) -> None:
        self.url = url
        self.prefix = key_prefix
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.id_index_size = id_index_size
        self.timeout = timeout
        self.max_connections = max_connections
        self.max_backoff = max_backoff
        self.health_interval = health_interval
        self._keys = Keys(key_prefix)
        self._redis: aioredis.Redis | None = None
        self._subscriber: aioredis.Redis | Any = None
        self._blocking: redis.Redis | Any = None
        self._scripts: Scripts | None = None
        self._coordination = RedisCoordination(self._keys, redact(url))
        self.coordination = self._coordination
        self._runs = RedisRunLedger(key_prefix, redact(url))
        self.runs = self._runs
        self._listener = Listener(
            self._keys,
            where=redact(url),
            history_size=history_size,
            timeout=timeout,
            health_interval=health_interval,
            max_backoff=max_backoff,
            head=self.head,
            replay=self.replay,
        )
        # Publish tokens: one per script call, named by its batch (see lua/publish.lua);
        # the prefix is drawn at start, in the process that publishes. Redis keeps a
        # token until its reply arrives (the next call deletes it), or for as long as
        # history when it never does.
        self._token_prefix = ""
        self._acknowledged: list[str] = []
        self._calls = PublishCalls(
            self._keys,
            history_size=history_size,
            history_ttl_ms=round(history_ttl * 1000),
            id_index_size=id_index_size,
            token_ttl_ms=round(max(history_ttl, 2 * timeout + 1) * 1000),
        )

    @classmethod
    def from_settings(cls, settings: SSESettings) -> RedisBackend:
        """A backend configured by ``SSE_REDIS_*`` and the history settings."""
        return cls(
            settings.redis_url,
            key_prefix=settings.redis_key_prefix,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            id_index_size=settings.redis_id_index_size,
            timeout=settings.redis_timeout,
            max_connections=settings.redis_max_connections,
            max_backoff=settings.redis_max_backoff,
            health_interval=settings.redis_health_interval,
        )

    @property
    def errors(self) -> int:
        """Losses of the subscription connection (see :attr:`Backend.errors`)."""
        return self._listener.errors

    @errors.setter
    def errors(self, value: int) -> None:
        self._listener.errors = value

    @property
    def reconnects(self) -> int:
        """Subscription connections re-established (see :attr:`Backend.reconnects`)."""
        return self._listener.reconnects

    @reconnects.setter
    def reconnects(self, value: int) -> None:
        self._listener.reconnects = value

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, sink: Sink) -> None:
        """Check the server (reachable, credentials, scripting, version), then open the
        subscription connection. Raises :class:`BackendError` saying what to fix."""
        client, subscriber = open_clients(self.url, max_connections=self.max_connections, timeout=self.timeout)
        scripts = Scripts(client)
        head = await check_server(client, subscriber, scripts.init, self._keys, redact(self.url))
        self._redis, self._subscriber, self._scripts = client, subscriber, scripts
        self._blocking = open_publishing_pool(self.url, max_connections=self.max_connections, timeout=self.timeout)
        self._token_prefix = uuid.uuid4().hex[:12] + ":"
        self._coordination.attach(client)
        self._runs.attach(client)
        try:
            await self._listener.start(subscriber, client, scripts.init, sink, head)
        except Exception:
            await self.close()
            raise

    async def close(self) -> None:
        await self._listener.stop()
        if self._redis is not None:
            await close_clients(self._redis, self._subscriber)
            self._blocking.close()
            self._redis = self._scripts = None
            self._coordination.detach()
            self._runs.detach()
        self._listener.detach()

    # -- subscriptions -----------------------------------------------------------------

    async def listen(self, channels: Collection[str]) -> None:
        """Subscribe (once per Redis channel) and return when Redis has confirmed it;
        raises :class:`BackendError` while Redis is unreachable."""
        await self._listener.listen(channels)

    async def unlisten(self, channels: Collection[str]) -> None:
        await self._listener.unlisten(channels)

    # -- publishing and history -----------------------------------------------------------

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise BackendError("the redis backend is not started")
        return self._redis

    def _started_scripts(self) -> Scripts:
        if self._scripts is None:
            raise BackendError("the redis backend is not started")
        return self._scripts

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
        """Store and announce a batch in one round trip: one script call per at most
        2,000 events, pipelined. Sent again with the same publication keys (after a
        failure), the calls that already ran are not stored again."""
        scripts = self._started_scripts()
        if not publications:
            return []
        cut = chunks(publications)
        forget, self._acknowledged = self._acknowledged, []
        try:
            if len(publications) <= _INLINE_EVENTS:
                # A few events: one call from the loop costs less than a thread hop.
                calls = [self._script_call(cut[0])]
                forget_tokens(calls[0], forget)
                firsts = [await scripts.publish(*calls[0])]
            else:
                # Built in the thread too: the event loop goes on with its streams.
                calls, firsts = await asyncio.to_thread(self._build_and_send, scripts.publish.sha, cut, forget)
        except (RedisError, OSError) as exc:
            # The token keys may not have been deleted: the next call deletes them.
            self._acknowledged = forget + self._acknowledged
            raise BackendError(
                f"could not publish to channel {publications[0].channel!r} on Redis at {redact(self.url)}: {exc}"
            ) from exc
        if len(self._acknowledged) < _FORGET_MAX:
            self._acknowledged += [token_of(call) for call in calls]
        messages = []
        for chunk, first in zip(cut, firsts, strict=True):
            seq = int(first)
            for p in chunk:
                messages.append(Message(seq, p.channel, p.event_id or str(seq), p.payload))
                seq += 1
        return messages

    def _build_and_send(
        self, sha: str, cut: list[Sequence[Publication]], forget: list[str]
    ) -> tuple[list[Call], list[Any]]:
        """In a thread: the script calls of a batch (the first also deletes the token
        keys ``forget``), and their first seqs once run in one round trip."""
        calls = [self._script_call(chunk) for chunk in cut]
        forget_tokens(calls[0], forget)
        return calls, send(self._blocking, sha, calls)

    def _script_call(self, chunk: Sequence[Publication]) -> Call:
        """KEYS and ARGV of one call of the publish script (see ``lua/publish.lua``)."""
        return self._calls.call(chunk, self._token_prefix)

    async def head(self) -> int:
        try:
            return int(await self._client().get(self._keys.seq) or 0)
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not read from Redis at {redact(self.url)}: {exc}") from exc

    async def resolve(self, event_id: str, channels: Collection[str]) -> int | None:
        fields = [c + "\n" + event_id for c in dict.fromkeys(channels)]
        try:
            values: list[bytes | None] = await self._client().hmget(self._keys.ids, fields) if fields else []  # type: ignore[assignment]
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not read from Redis at {redact(self.url)}: {exc}") from exc
        found = {v for v in values if v is not None}
        if found:
            # One message among the client's channels, else unknown (see Backend.resolve).
            return int(found.pop()) if len(found) == 1 and b"r" not in found else None
        if event_id.isascii() and event_id.isdigit():
            value = int(event_id)
            return value if value <= await self.head() else None
        return None

    async def replay(self, channels: Collection[str], after: int | None) -> Replay:
        names = list(dict.fromkeys(channels))
        if after is None:
            return Replay((), await self.head(), frozenset(names))
        k = self._keys
        keys = [k.seq, k.last, k.live, k.trim, k.floor, k.dead, *(k.history(c) for c in names)]
        try:
            script = self._started_scripts().replay
            head, gaps, found, floors = await script(keys, [after, round(self.history_ttl * 1000), *names])
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not read history from Redis at {redact(self.url)}: {exc}") from exc
        messages = [parse_member(found[i].decode(), found[i + 1]) for i in range(0, len(found), 2)]
        messages.sort(key=lambda m: m.seq)
        floor_of = dict(zip(names, map(int, floors), strict=True))
        return Replay(messages, int(head), frozenset(g.decode() for g in gaps), floor_of)


__all__ = ["MIN_REDIS_VERSION", "RedisBackend"]
