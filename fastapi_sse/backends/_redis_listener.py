"""The subscription connection of the Redis backend: which channels this worker
listens to, and the messages that arrive on them, handed to the :class:`Sink`.

When the connection is lost, the listener reconnects with backoff, subscribes again,
and reads from history what its channels missed before it lets live messages
through again; what history lost is reported to the sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from fastapi_sse._names import CLIENT_CHANNEL_PREFIX
from fastapi_sse.backends._redis_keys import Keys
from fastapi_sse.backends._redis_scripts import parse_published
from fastapi_sse.backends.base import Message, Replay, Sink
from fastapi_sse.errors import BackendError

logger = logging.getLogger("fastapi_sse.redis")

_DELIVER_BATCH = 256
"""Messages the subscription reader delivers before it lets the streams' writer run."""


class Listener:
    """One worker's subscription connection and the channels routed through it.

    ``where`` names the server in messages (the URL without its password); ``head``
    and ``replay`` read the shared counter and history, for the catch-up after a
    reconnection.
    """

    def __init__(
        self,
        keys: Keys,
        *,
        where: str,
        history_size: int,
        timeout: float,
        health_interval: float,
        max_backoff: float,
        head: Callable[[], Awaitable[int]],
        replay: Callable[[Collection[str], int | None], Awaitable[Replay]],
    ) -> None:
        self.errors = 0
        self.reconnects = 0
        self.last_seq = 0
        """The newest seq delivered (or, at start, the head)."""
        self._keys = keys
        self._where = where
        self._history_size = history_size
        self._timeout = timeout
        self._health_interval = health_interval
        self._max_backoff = max_backoff
        self._head = head
        self._replay = replay
        self._subscriber: aioredis.Redis | Any = None
        self._client: aioredis.Redis | Any = None
        self._init_script: AsyncScript | Any = None
        self._sink: Sink | None = None
        self._routes: dict[str, int] = {}  # Redis channel -> listened channels routed to it
        self._listened: dict[str, int] = {}  # channel -> seq it has been live since
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._pubsub: Any = None
        self._lock = asyncio.Lock()
        self._ready: asyncio.Future[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._burst = 0  # messages delivered since the reader last let the writer run
        self._closing = False

    async def start(
        self, subscriber: aioredis.Redis, client: aioredis.Redis, init: AsyncScript, sink: Sink, last_seq: int
    ) -> None:
        """Hold the subscription connection on ``subscriber`` from now on (``client``
        reads worker backlogs, ``init`` restarts a lost counter), delivering after
        ``last_seq``; return once it is first live."""
        self._subscriber, self._client, self._init_script = subscriber, client, init
        self._sink = sink
        self.last_seq = last_seq
        self._closing = False
        self._ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.get_running_loop().create_task(self._run())
        async with asyncio.timeout(self._timeout * 2):
            await asyncio.shield(self._ready)

    async def stop(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader], timeout=self._timeout)
            self._reader = None

    def detach(self) -> None:
        """Deliver nothing more (the backend is closed)."""
        self._sink = None

    # -- listened channels ------------------------------------------------------------

    async def listen(self, channels: Collection[str]) -> None:
        """Subscribe (once per Redis channel) and return when Redis has confirmed it;
        raises :class:`BackendError` while Redis is unreachable."""
        fresh: list[str] = []
        waits: list[asyncio.Future[None]] = []
        async with self._lock:
            pubsub = self._pubsub
            if pubsub is None:
                raise BackendError(f"not connected to Redis at {self._where}; reconnecting")
            new = [c for c in channels if c not in self._listened]
            for channel in new:
                route = self._keys.route(channel)
                self._routes[route] = self._routes.get(route, 0) + 1
                if self._routes[route] == 1:
                    fresh.append(route)
                    future = asyncio.get_running_loop().create_future()
                    self._waiting.setdefault(route, []).append(future)
                    waits.append(future)
                self._listened[channel] = self.last_seq
            try:
                if fresh:
                    await pubsub.subscribe(*fresh)
            except (RedisError, OSError) as exc:
                self._forget(new)
                raise BackendError(f"could not subscribe on Redis at {self._where}: {exc}") from exc
        try:
            if waits:
                async with asyncio.timeout(self._timeout):
                    await asyncio.gather(*waits)
        except (BackendError, TimeoutError) as exc:
            # Not live: forget them, so that the service's retry subscribes again.
            self._forget(new)
            raise BackendError(f"Redis did not confirm the subscription: {exc or 'timed out'}") from exc
        tracked = [c for c in new if not c.startswith(CLIENT_CHANNEL_PREFIX)]
        if tracked:
            # Events before this point are not this worker's to catch up on later.
            with contextlib.suppress(BackendError):
                head = await self._head()
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

    # -- the connection ---------------------------------------------------------------

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
                    logger.warning("reconnected to Redis at %s", self._where)
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
                    self._ready.set_exception(BackendError(f"cannot subscribe on Redis at {self._where}: {exc}"))
                    return
                logger.warning(
                    "lost the Redis subscription connection to %s (%s); reconnecting in %.2fs",
                    self._where,
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
            delay = min(delay * 2, self._max_backoff)

    async def _connect(self, pubsub: Any, *, catch_up: bool) -> list[dict[str, Any]]:
        """Subscribe to every routed channel, wait for Redis to confirm, then deliver
        from history what the listened channels missed. Returns live messages read
        meanwhile, to be handled after the catch-up."""
        async with self._lock:
            await self._init_script([self._keys.seq, self._keys.floor])
            routes = [self._keys.sys, *self._routes]
            await pubsub.subscribe(*routes)
            unconfirmed = {r.encode() for r in routes}
            pending: list[dict[str, Any]] = []
            async with asyncio.timeout(self._timeout):
                while unconfirmed:
                    message = await pubsub.get_message(timeout=self._timeout)
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
                by_after.setdefault(max(since, self.last_seq), []).append(channel)
        messages: list[Message] = []
        gaps: set[str] = set()
        for after, channels in by_after.items():
            replay = await self._replay(channels, after)
            messages.extend(replay.messages)
            gaps |= replay.gaps
        for route in self._routes:
            backlog_key = self._keys.route_backlog(route)
            if backlog_key is None:
                continue
            cap = max(self._history_size, 1)
            raw = await self._client.lrange(backlog_key, 0, -1)
            backlog = [parse_published(item) for item in raw if isinstance(item, bytes)]
            missed = [m for m in backlog if m.seq > self.last_seq]
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
            message = await pubsub.get_message(timeout=self._health_interval)
            if message is None:
                if probe_sent:
                    raise ConnectionError(f"Redis did not answer PING within {self._health_interval}s")
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
        if message.seq <= self.last_seq:
            return
        self.last_seq = message.seq
        if self._sink is not None:
            self._sink.deliver(message)
