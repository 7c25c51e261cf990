"""Opening the Redis Cluster backend's client and checking the cluster it reaches."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from fastapi_sse.backends._redis_connection import redact
from fastapi_sse.backends._redis_scripts import parse_published
from fastapi_sse.backends.base import Message
from fastapi_sse.errors import BackendError

MIN_VERSION = (7, 0)
"""Oldest Redis the cluster backend runs on (sharded pub/sub)."""


async def open_cluster(url: str, *, max_connections: int, socket_timeout: float) -> RedisCluster:
    """A client of the cluster ``url`` names a node of, its slot map read and every
    master checked; raises :class:`BackendError` saying what to fix."""
    where = redact(url)
    try:
        cluster = RedisCluster.from_url(
            url,
            max_connections=max_connections,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 1),
        )
    except ValueError as exc:
        raise BackendError(f"SSE_REDIS_URL {where!r} is not a Redis URL: {exc}") from None
    try:
        await cluster.initialize()
        versions = await cluster.info("server", target_nodes=RedisCluster.PRIMARIES)
        for node, info in _per_node(versions).items():
            version = tuple(int(p) for p in str(info.get("redis_version", "0.0")).split(".")[:2])
            if version < MIN_VERSION:
                raise BackendError(
                    f"Redis at {node} is version {info.get('redis_version')}; the redis-cluster backend "
                    "needs 7.0 or newer (sharded pub/sub)"
                )
    except BackendError:
        await cluster.aclose()
        raise
    except (RedisError, RedisClusterException, OSError) as exc:
        await cluster.aclose()
        raise BackendError(
            f"cannot reach the Redis Cluster at {where} ({exc}): check SSE_REDIS_URL, that the nodes run "
            "with cluster-enabled yes and that the cluster is up (CLUSTER INFO says cluster_state:ok)"
        ) from None
    return cluster


class Shard:
    """The subscription connection to one master, and the tags routed through it."""

    def __init__(self, name: str, client: aioredis.Redis) -> None:
        self.name = name
        self.client = client
        self.pubsub: Any = client.pubsub()
        self.tags: set[str] = set()
        self.reader: asyncio.Task[None] | None = None
        self.waiting: dict[str, list[asyncio.Future[None]]] = {}
        self.failed = False

    def fail(self, error: BackendError) -> None:
        """Subscriptions waiting for Redis's confirmation fail with ``error``."""
        for futures in self.waiting.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)
        self.waiting.clear()

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(BaseException):
                await self.reader
        self.fail(BackendError("the shard subscription connection was lost"))
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()
        with contextlib.suppress(Exception):
            await self.client.aclose()


def shard_client(node: Any, cluster: RedisCluster, socket_timeout: float) -> aioredis.Redis:
    """A client of one connection to ``node`` for its shard subscriptions. No retries
    inside redis-py: a silent reconnect would skip the catch-up."""
    return aioredis.Redis(
        host=node.host,
        port=node.port,
        username=cluster.connection_kwargs.get("username"),
        password=cluster.connection_kwargs.get("password"),
        retry=Retry(NoBackoff(), 0),
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        max_connections=1,
    )


async def read_backlog(cluster: RedisCluster, key: str, after: int, size: int) -> tuple[list[Message], bool]:
    """The events for a worker's clients after ``after`` in its backlog, and whether
    some may be gone (the backlog filled up with events all after it)."""
    raw = await cluster.lrange(key, 0, -1)
    backlog = [parse_published(item) for item in raw if isinstance(item, bytes)]
    missed = [m for m in backlog if m.seq > after]
    return missed, len(backlog) >= max(size, 1) and len(missed) == len(backlog)


def _per_node(reply: Any) -> dict[str, dict[str, Any]]:
    """``INFO`` of several nodes, by node (redis-py answers one node's dict when there is one)."""
    if isinstance(reply, dict) and reply and all(isinstance(v, dict) for v in reply.values()):
        return reply
    return {"the cluster": reply}


__all__: list[str] = []  # internal: the cluster backend uses it
