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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from fastapi_sse._names import CLIENT_CHANNEL_PREFIX
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
from fastapi_sse.backends._redis_scripts import (
    PUBLISH,
    Call,
    PublishCalls,
    Scripts,
    chunks,
    forget_tokens,
    parse_member,
    parse_published,
    send,
    token_of,
)
from fastapi_sse.backends.base import Backend, Message, Publication, Replay, Sink
from fastapi_sse.errors import BackendError

if TYPE_CHECKING:
    from fastapi_sse.settings import SSESettings

logger = logging.getLogger("fastapi_sse.redis")

_INLINE_EVENTS = 64
"""Batches up to this size are sent from the event loop; larger ones from a thread."""

_DELIVER_BATCH = 256
"""Messages the subscription reader delivers before it lets the streams' writer run."""

_FORGET_MAX = 10_000
"""Token keys remembered for deletion; beyond, they expire on their own."""

# bench/redis_floor.py runs the publish script with exactly the backend's arguments:
# it reads these two names, RedisBackend._token_prefix and RedisBackend._script_call.
_PUBLISH = PUBLISH
_chunks = chunks


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
        self._redis: aioredis.Redis | None = None
        self._subscriber: aioredis.Redis | Any = None
        self._sink: Sink | None = None
        self._routes: dict[str, int] = {}  # Redis channel -> listened channels routed to it
        self._listened: dict[str, int] = {}  # channel -> seq it has been live since
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._pubsub: Any = None
        self._lock = asyncio.Lock()
        self._ready: asyncio.Future[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._last_seq = 0
        self._burst = 0  # messages delivered since the reader last let the writer run
        self._closing = False
        # Publish tokens: one per script call, named by its batch (see lua/publish.lua); the
        # prefix is drawn at start, in the process that publishes. Redis keeps a token
        # until its reply arrives (the next call deletes it), or for as long as history
        # when it never does.
        self._token_prefix = ""
        self._acknowledged: list[str] = []
        self._blocking: redis.Redis | Any = None
        self._scripts: Scripts | None = None
        self._keys = Keys(key_prefix)
        self._coordination = RedisCoordination(self._keys, redact(url))
        self.coordination = self._coordination
        self._calls = PublishCalls(
            self._keys,
            history_size=history_size,
            history_ttl_ms=round(history_ttl * 1000),
            id_index_size=id_index_size,
            token_ttl_ms=round(max(history_ttl, 2 * timeout + 1) * 1000),
        )
        k = key_prefix
        self._k_seq, self._k_last, self._k_live = k + "seq", k + "last", k + "live"
        self._k_trim, self._k_floor, self._k_dead = k + "trim", k + "floor", k + "dead"
        self._k_ids, self._k_id_times = k + "ids", k + "idtimes"
        self._k_sys = k + "sys"

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

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, sink: Sink) -> None:
        """Check the server (reachable, credentials, scripting, version), then open the
        subscription connection. Raises :class:`BackendError` saying what to fix."""
        client, subscriber = open_clients(self.url, max_connections=self.max_connections, timeout=self.timeout)
        scripts = Scripts(client)
        self._last_seq = await check_server(client, subscriber, scripts.init, self._keys, redact(self.url))
        self._redis, self._subscriber, self._scripts = client, subscriber, scripts
        self._blocking = open_publishing_pool(self.url, max_connections=self.max_connections, timeout=self.timeout)
        self._token_prefix = uuid.uuid4().hex[:12] + ":"
        self._coordination.attach(client)
        try:
            await self._start_listening(sink)
        except Exception:
            await self.close()
            raise

    async def _start_listening(self, sink: Sink) -> None:
        """Hold the subscription connection from now on; return once it is first live."""
        self._closing = False
        self._sink = sink
        self._ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.get_running_loop().create_task(self._run())
        async with asyncio.timeout(self.timeout * 2):
            await asyncio.shield(self._ready)

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader], timeout=self.timeout)
            self._reader = None
        if self._redis is not None:
            await close_clients(self._redis, self._subscriber)
            self._blocking.close()
            self._redis = self._scripts = None
            self._coordination.detach()
        self._sink = None

    # -- subscriptions -----------------------------------------------------------------

    async def listen(self, channels: Collection[str]) -> None:
        """Subscribe (once per Redis channel) and return when Redis has confirmed it;
        raises :class:`BackendError` while Redis is unreachable."""
        fresh: list[str] = []
        waits: list[asyncio.Future[None]] = []
        async with self._lock:
            pubsub = self._pubsub
            if pubsub is None:
                raise BackendError(f"not connected to Redis at {redact(self.url)}; reconnecting")
            new = [c for c in channels if c not in self._listened]
            for channel in new:
                route = self._keys.route(channel)
                self._routes[route] = self._routes.get(route, 0) + 1
                if self._routes[route] == 1:
                    fresh.append(route)
                    future = asyncio.get_running_loop().create_future()
                    self._waiting.setdefault(route, []).append(future)
                    waits.append(future)
                self._listened[channel] = self._last_seq
            try:
                if fresh:
                    await pubsub.subscribe(*fresh)
            except (RedisError, OSError) as exc:
                self._forget(new)
                raise BackendError(f"could not subscribe on Redis at {redact(self.url)}: {exc}") from exc
        try:
            if waits:
                async with asyncio.timeout(self.timeout):
                    await asyncio.gather(*waits)
        except (BackendError, TimeoutError) as exc:
            # Not live: forget them, so that the service's retry subscribes again.
            self._forget(new)
            raise BackendError(f"Redis did not confirm the subscription: {exc or 'timed out'}") from exc
        tracked = [c for c in new if not c.startswith(CLIENT_CHANNEL_PREFIX)]
        if tracked:
            # Events before this point are not this worker's to catch up on later.
            with contextlib.suppress(BackendError):
                head = await self.head()
                for channel in tracked:
                    if channel in self._listened:
                        self._listened[channel] = max(self._listened[channel], head)

    def _forget(self, channels: Collection[str]) -> None:
        for channel in channels:
            if self._listened.pop(channel, None) is None:
                continue
            route = self._keys.route(channel)
            count = self._routes.get(route, 0) - 1
            if count > 0:
                self._routes[route] = count
            else:
                self._routes.pop(route, None)
                for future in self._waiting.pop(route, ()):
                    future.cancel()

    async def unlisten(self, channels: Collection[str]) -> None:
        async with self._lock:
            before = set(self._routes)
            self._forget(channels)
            gone = sorted(before - set(self._routes))
            if gone and self._pubsub is not None:
                with contextlib.suppress(RedisError, OSError):
                    await self._pubsub.unsubscribe(*gone)

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
        self, channel: str, payload: bytes, event_id: str | None, *, store: bool, index: Collection[str] = ()
    ) -> Message:
        return (await self.publish_many([Publication(channel, payload, event_id, store, index)]))[0]

    async def publish_many(self, publications: Sequence[Publication]) -> list[Message]:
        """Store and announce a batch in one round trip: one script call per
        ``_SCRIPT_EVENTS`` events, pipelined. Sent again with the same publication keys
        (after a failure), the calls that already ran are not stored again."""
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
            return int(await self._client().get(self._k_seq) or 0)
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not read from Redis at {redact(self.url)}: {exc}") from exc

    async def resolve(self, event_id: str, channels: Collection[str]) -> int | None:
        fields = [c + "\n" + event_id for c in dict.fromkeys(channels)]
        try:
            values: list[bytes | None] = await self._client().hmget(self._k_ids, fields) if fields else []  # type: ignore[assignment]
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
        keys = [self._k_seq, self._k_last, self._k_live, self._k_trim, self._k_floor, self._k_dead]
        keys += [self.prefix + "h:" + c for c in names]
        try:
            script = self._started_scripts().replay
            head, gaps, found, floors = await script(keys, [after, round(self.history_ttl * 1000), *names])
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not read history from Redis at {redact(self.url)}: {exc}") from exc
        messages = [parse_member(found[i].decode(), found[i + 1]) for i in range(0, len(found), 2)]
        messages.sort(key=lambda m: m.seq)
        floor_of = dict(zip(names, map(int, floors), strict=True))
        return Replay(messages, int(head), frozenset(g.decode() for g in gaps), floor_of)

    # -- the subscription connection --------------------------------------------------------

    async def _run(self) -> None:
        """Hold the subscription connection: connect, catch up, read; on any failure
        start again after a growing delay."""
        delay = 0.05
        first = True
        while not self._closing:
            pubsub: Any = self._subscriber.pubsub()
            try:
                pending = await self._connect(pubsub, catch_up=not first)
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(None)
                if not first:
                    self.reconnects += 1
                    logger.warning("reconnected to Redis at %s", redact(self.url))
                first = False
                delay = 0.05
                for message in pending:
                    self._on_message(message)
                self._burst = len(pending)
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    return
                self.errors += 1
                if first and self._ready is not None and not self._ready.done():
                    self._ready.set_exception(BackendError(f"cannot subscribe on Redis at {redact(self.url)}: {exc}"))
                    return
                logger.warning(
                    "lost the Redis subscription connection to %s (%s); reconnecting in %.2fs",
                    redact(self.url),
                    exc,
                    delay,
                )
            finally:
                self._pubsub = None
                for futures in self._waiting.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(BackendError("the Redis subscription connection was lost"))
                self._waiting.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)

    async def _connect(self, pubsub: Any, *, catch_up: bool) -> list[dict[str, Any]]:
        """Subscribe to every routed channel, wait for Redis to confirm, then deliver
        from history what the listened channels missed. Returns live messages read
        meanwhile, to be handled after the catch-up."""
        async with self._lock:
            await self._started_scripts().init([self._k_seq, self._k_floor])
            routes = [self._k_sys, *self._routes]
            await pubsub.subscribe(*routes)
            unconfirmed = {r.encode() for r in routes}
            pending: list[dict[str, Any]] = []
            async with asyncio.timeout(self.timeout):
                while unconfirmed:
                    message = await pubsub.get_message(timeout=self.timeout)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        unconfirmed.discard(message["channel"])
                    elif message["type"] == "message":
                        pending.append(message)
            if catch_up:
                await self._catch_up()
            self._pubsub = pubsub
        return pending

    async def _catch_up(self) -> None:
        """Deliver, in order, what history holds after the last delivered seq on every
        listened channel; report the channels whose history no longer reaches back."""
        by_after: dict[int, list[str]] = {}
        for channel, since in self._listened.items():
            if not channel.startswith(CLIENT_CHANNEL_PREFIX):
                by_after.setdefault(max(since, self._last_seq), []).append(channel)
        messages: list[Message] = []
        gaps: set[str] = set()
        for after, channels in by_after.items():
            replay = await self.replay(channels, after)
            messages.extend(replay.messages)
            gaps |= replay.gaps
        for route in self._routes:
            backlog_key = self._keys.route_backlog(route)
            if backlog_key is None:
                continue
            cap = max(self.history_size, 1)
            raw = await self._client().lrange(backlog_key, 0, -1)
            backlog = [parse_published(item) for item in raw if isinstance(item, bytes)]
            missed = [m for m in backlog if m.seq > self._last_seq]
            messages.extend(missed)
            if len(backlog) >= cap and len(missed) == len(backlog):
                # The backlog overflowed while this worker was cut off: some events for
                # its clients may be gone. Their clients resume (and replay channels).
                gaps.update(c for c in self._listened if c.startswith(CLIENT_CHANNEL_PREFIX))
        messages.sort(key=lambda m: m.seq)
        for done, message in enumerate(messages, 1):
            self._handle(message)
            if not done % _DELIVER_BATCH:
                await self._settle()
        if gaps:
            logger.warning(
                "history no longer holds what %d channel(s) missed while Redis was unreachable; "
                "their clients are closed so that they resume",
                len(gaps),
            )
            if self._sink is not None:
                self._sink.lost(sorted(gaps))

    async def _read(self, pubsub: Any) -> None:
        probe_sent = False
        while True:
            message = await pubsub.get_message(timeout=self.health_interval)
            if message is None:
                if probe_sent:
                    raise ConnectionError(f"Redis did not answer PING within {self.health_interval}s")
                await pubsub.ping()
                probe_sent = True
                continue
            probe_sent = False
            self._on_message(message)
            self._burst += 1
            if self._burst >= _DELIVER_BATCH:
                # Data already buffered is read without suspending: let the writer
                # write this batch before the next one.
                await self._settle()

    async def _settle(self) -> None:
        self._burst = 0
        await (self._sink.settle() if self._sink is not None else asyncio.sleep(0))

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "message":
            self._handle(parse_published(message["data"]))
        elif kind == "subscribe":
            for future in self._waiting.pop(message["channel"].decode(), ()):
                if not future.done():
                    future.set_result(None)

    def _handle(self, message: Message) -> None:
        # After a reconnection the catch-up has already delivered these.
        if message.seq <= self._last_seq:
            return
        self._last_seq = message.seq
        if self._sink is not None:
            self._sink.deliver(message)


__all__ = ["MIN_REDIS_VERSION", "RedisBackend"]
