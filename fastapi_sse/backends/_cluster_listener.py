"""The shard subscriptions of the Redis Cluster backend: one connection per master,
``SSUBSCRIBE`` to each tag's shard channel there, messages handed to the sink.

When a connection is lost (failover, or Redis cut a slow subscriber off) or a slot
moves (Redis sends ``sunsubscribe``), the listener reads the slot map again,
subscribes on the new owner and delivers from history what each channel missed
before the live messages held meanwhile; what history lost goes to the sink. Events
it saw that a new master lacks (lost in a failover) are marked lost there, so that a
resume from before them gets a ``gap``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from fastapi_sse._names import CLIENT_CHANNEL_PREFIX
from fastapi_sse.backends._cluster_connection import Shard, read_backlog, shard_client
from fastapi_sse.backends._cluster_keys import ClusterKeys
from fastapi_sse.backends._redis_scripts import parse_published
from fastapi_sse.backends.base import Message, Replay, Sink
from fastapi_sse.errors import BackendError

logger = logging.getLogger("fastapi_sse.redis")
_DELIVER_BATCH = 256  # messages a shard reader delivers before it lets the writer run

ReplayEach = Callable[[dict[str, int]], Awaitable[Replay]]


class ShardListener:
    """One worker's shard subscriptions on a Redis Cluster.

    ``replay`` reads history after a cursor per channel; ``repair`` marks events a new
    master lacks (see ``lua/cluster_repair.lua``); ``where`` names the cluster in
    messages.
    """

    def __init__(
        self,
        keys: ClusterKeys,
        *,
        where: str,
        history_size: int,
        timeout: float,
        health_interval: float,
        max_backoff: float,
        replay: ReplayEach,
        repair: Callable[[str, int, list[str]], Awaitable[bool]],
        heads: Callable[[list[str]], Awaitable[dict[str, int]]],
    ) -> None:
        self.errors = self.reconnects = 0
        self._keys, self._where, self._history_size = keys, where, history_size
        self._timeout, self._health_interval, self._max_backoff = timeout, health_interval, max_backoff
        self._replay, self._repair, self._heads = replay, repair, heads
        self._cluster: RedisCluster | Any = None
        self._sink: Sink | None = None
        self._tags: dict[str, set[str]] = {}  # tag -> listened channels
        self._last: dict[str, int] = {}  # tag -> newest seq delivered
        self._since: dict[str, int] = {}  # tag -> seq it has been live since
        self._shards: dict[str, Shard] = {}  # node name -> its connection
        self._owner: dict[str, str] = {}  # tag -> node name
        self._lock = asyncio.Lock()
        self._unsettled: set[str] = set()  # tags to subscribe again
        self._held: dict[str, list[Message]] = {}  # tag -> live messages read while it catches up
        self._resync: asyncio.Task[None] | None = None
        self._closing, self._burst = False, 0

    def start(self, cluster: RedisCluster, sink: Sink) -> None:
        self._cluster, self._sink, self._closing = cluster, sink, False

    async def stop(self) -> None:
        self._closing = True
        if self._resync is not None:
            self._resync.cancel()
            with contextlib.suppress(BaseException):
                await self._resync
            self._resync = None
        for shard in list(self._shards.values()):
            await shard.close()
        self._shards, self._owner = {}, {}

    def detach(self) -> None:  # the backend closed
        self._sink = None

    # -- listened channels ------------------------------------------------------------

    async def listen(self, channels: Collection[str]) -> None:
        """Subscribe (once per tag, on its master) and return when Redis has confirmed
        it; raises :class:`BackendError` while the master is unreachable."""
        new = [c for c in dict.fromkeys(channels) if c not in self._tags.get(self._keys.tag(c), ())]
        if not new:
            return
        fresh: list[str] = []
        for channel in new:
            tag = self._keys.tag(channel)
            members = self._tags.setdefault(tag, set())
            if not members and tag not in self._owner:
                fresh.append(tag)
            members.add(channel)
        try:
            async with self._lock:
                await self._subscribe(fresh)
        except (RedisError, OSError, BackendError, TimeoutError) as exc:
            self._forget(new)
            raise BackendError(f"could not subscribe on the Redis Cluster at {self._where}: {exc}") from exc
        tracked = [t for t in fresh if not t.startswith("w:")]
        if tracked:
            # Events before this point are not this worker's to catch up on later.
            with contextlib.suppress(BackendError, RedisError, OSError):
                heads = await self._heads(tracked)  # a channel's tag is its name
                for tag, head in heads.items():
                    if tag in self._tags:
                        self._since[tag] = max(self._since.get(tag, 0), head)

    def position(self, channel: str) -> int | None:
        """Where a live channel is for this worker (every later event reaches it), or None."""
        tag = self._keys.tag(channel)
        if tag not in self._owner or tag in self._held or tag not in self._since:
            return None
        return max(self._since[tag], self._last.get(tag, 0))

    def _forget(self, channels: Collection[str]) -> None:
        for channel in channels:
            tag = self._keys.tag(channel)
            members = self._tags.get(tag)
            if members is None:
                continue
            members.discard(channel)
            if not members:
                del self._tags[tag]
                self._last.pop(tag, None)
                self._since.pop(tag, None)

    async def unlisten(self, channels: Collection[str]) -> None:
        async with self._lock:
            self._forget(channels)
            gone = [t for t in self._owner if t not in self._tags]
            for tag in gone:
                shard = self._shards.get(self._owner.pop(tag))
                if shard is None:
                    continue
                shard.tags.discard(tag)
                with contextlib.suppress(RedisError, OSError):
                    await shard.pubsub.sunsubscribe(self._keys.base(tag))

    # -- subscribing --------------------------------------------------------------------

    def _node_of(self, tag: str) -> Any:
        return self._cluster.nodes_manager.get_node_from_slot(key_slot(self._keys.base(tag).encode()))

    async def _subscribe(self, tags: Collection[str]) -> None:
        """Subscribe to the shard channels of ``tags`` on their masters; under the lock."""
        by_node: dict[str, list[str]] = {}
        nodes: dict[str, Any] = {}
        for tag in tags:
            node = self._node_of(tag)
            nodes[node.name] = node
            by_node.setdefault(node.name, []).append(tag)
        waits: list[asyncio.Future[None]] = []
        for name, group in by_node.items():
            shard = await self._shard(nodes[name])
            loop = asyncio.get_running_loop()
            for tag in group:
                future = loop.create_future()
                shard.waiting.setdefault(self._keys.base(tag), []).append(future)
                waits.append(future)
                shard.tags.add(tag)
                self._owner[tag] = name
                # One shard channel per call: SSUBSCRIBE takes channels of one slot.
                await shard.pubsub.ssubscribe(self._keys.base(tag))
            if shard.reader is None:
                # Read once subscribed: a connection without subscriptions has nothing to read.
                shard.reader = asyncio.get_running_loop().create_task(self._read(shard))
        if waits:
            async with asyncio.timeout(self._timeout):
                await asyncio.gather(*waits)

    async def _shard(self, node: Any) -> Shard:
        shard = self._shards.get(node.name)
        if shard is None or shard.failed:
            if shard is not None:
                await shard.close()
            shard = self._shards[node.name] = Shard(node.name, shard_client(node, self._cluster, self._timeout))
        return shard

    # -- reading --------------------------------------------------------------------------

    async def _read(self, shard: Shard) -> None:
        probe_sent = False
        try:
            while True:
                message = await shard.pubsub.get_message(timeout=self._health_interval)
                if message is None:
                    if probe_sent:
                        raise ConnectionError(f"Redis did not answer PING within {self._health_interval}s")
                    await shard.pubsub.ping()
                    probe_sent = True
                    continue
                probe_sent = False
                self._on_message(shard, message)
                self._burst += 1
                if self._burst >= _DELIVER_BATCH:
                    self._burst = 0
                    await (self._sink.settle() if self._sink is not None else asyncio.sleep(0))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._closing:
                return
            self.errors += 1
            shard.failed = True
            logger.warning("lost the shard subscription connection to %s (%s); resubscribing", shard.name, exc)
            self._unsettle(shard.tags)
            shard.fail(BackendError(f"lost the connection to {shard.name}"))

    def _on_message(self, shard: Shard, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "smessage":
            self._handle(parse_published(message["data"]))
        elif kind == "ssubscribe":
            for future in shard.waiting.pop(message["channel"].decode(), ()):
                if not future.done():
                    future.set_result(None)
        elif kind == "sunsubscribe":
            # Redis moved the slot away (or this worker unsubscribed): subscribe again
            # where it lives now if the tag is still listened to.
            route = message["channel"].decode()
            tag = route[len(self._keys.prefix) + 1 : -1]
            if tag in self._tags and self._owner.get(tag) == shard.name:
                shard.tags.discard(tag)
                self._unsettle([tag])

    def _handle(self, message: Message) -> None:
        """A live message: held while its tag catches up, so that it comes after."""
        held = self._held.get(self._keys.tag(message.channel))
        if held is not None:
            held.append(message)
        else:
            self._deliver(message)

    def _deliver(self, message: Message) -> None:
        tag = self._keys.tag(message.channel)
        # After a resubscription the catch-up has already delivered these.
        if message.seq <= self._last.get(tag, 0) or tag not in self._tags:
            return
        self._last[tag] = message.seq
        if self._sink is not None:
            self._sink.deliver(message)

    # -- recovering -----------------------------------------------------------------------

    def _unsettle(self, tags: Collection[str]) -> None:
        for tag in tags:
            self._owner.pop(tag, None)
            self._held.setdefault(tag, [])
        self._unsettled.update(tags)
        if self._resync is None and not self._closing:
            self._resync = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        """Subscribe the unsettled tags again where they live now, then catch up; on
        failure start again after a growing delay."""
        delay = 0.05
        try:
            while self._unsettled and not self._closing:
                tags = [t for t in self._unsettled if t in self._tags]
                self._unsettled.clear()
                try:
                    async with self._lock:
                        with contextlib.suppress(Exception):
                            await self._cluster.nodes_manager.initialize()
                        for name in [n for n, s in self._shards.items() if s.failed]:
                            await self._shards.pop(name).close()
                        await self._subscribe(tags)
                        await self._catch_up(tags)
                        for tag in tags:
                            for message in sorted(self._held.pop(tag, ()), key=lambda m: m.seq):
                                self._deliver(message)
                    self.reconnects += 1
                    logger.warning("resubscribed %d shard channel(s) on the cluster at %s", len(tags), self._where)
                    delay = 0.05
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.errors += 1
                    logger.warning(
                        "cannot resubscribe on the cluster at %s (%s); again in %.2fs", self._where, exc, delay
                    )
                    for tag in tags:
                        self._owner.pop(tag, None)
                    self._unsettled.update(tags)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._max_backoff)
        finally:
            self._resync = None

    async def _catch_up(self, tags: list[str]) -> None:
        """Deliver, in order, what history holds after the newest delivered seq of each
        tag; report the channels whose history no longer reaches back."""
        messages: list[Message] = []
        gaps: set[str] = set()
        channels: dict[str, int] = {}
        seen: dict[str, list[str]] = {}  # tags whose new master may lack what this worker saw
        for tag in tags:
            after = max(self._since.get(tag, 0), self._last.get(tag, 0))
            members = sorted(self._tags.get(tag, ()))
            if tag.startswith("w:"):
                missed, lost = await read_backlog(self._cluster, self._keys.backlog(tag), after, self._history_size)
                messages.extend(missed)
                if lost:
                    # The backlog overflowed while this worker was cut off: its clients resume.
                    gaps.update(c for c in members if c.startswith(CLIENT_CHANNEL_PREFIX))
                continue
            if after:
                seen[tag] = members
            channels.update(dict.fromkeys(members, after))
        # One repair call per tag, at once (the backend bounds the calls in flight).
        repaired = await asyncio.gather(*(self._repair(t, self._last.get(t, 0), m) for t, m in seen.items()))
        for tag, lacked in zip(seen, repaired, strict=True):
            if lacked:
                logger.warning("the new master of %s lacks events this worker saw: marked lost there", tag)
        if channels:
            replay = await self._replay(channels)
            messages.extend(replay.messages)
            gaps |= replay.gaps
        messages.sort(key=lambda m: m.seq)
        for done, message in enumerate(messages, 1):
            self._deliver(message)
            if not done % _DELIVER_BATCH and self._sink is not None:
                await self._sink.settle()
        if gaps:
            logger.warning(
                "history no longer holds what %d channel(s) missed while their shard was unreachable; "
                "their clients are closed so that they resume",
                len(gaps),
            )
            if self._sink is not None:
                self._sink.lost(sorted(gaps))


__all__: list[str] = []  # internal: the cluster backend uses it
