"""Opening the Redis backend's connections and checking the server it reaches."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError, ResponseError
from redis.retry import Retry as BlockingRetry

from fastapi_sse.backends._redis_keys import Keys
from fastapi_sse.errors import BackendError

MIN_REDIS_VERSION = (5, 0)
"""Oldest Redis this backend runs on (``ZPOPMIN``, effect replication of scripts)."""


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def open_clients(url: str, *, max_connections: int, timeout: float) -> tuple[aioredis.Redis, aioredis.Redis]:
    """The pooled client and the subscription connection's client (not connected yet)."""
    try:
        # One retry: a pooled connection may be stale after Redis restarted. A
        # burst of callers beyond the pool waits for a connection instead of failing.
        client = aioredis.Redis.from_pool(
            aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=timeout,
                retry=Retry(NoBackoff(), 1),
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
            )
        )
        # The subscription connection has its own single-connection pool and no
        # retries: a silent reconnect inside redis-py would skip the catch-up.
        subscriber = aioredis.Redis.from_url(
            url,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=1,
        )
    except ValueError as exc:
        raise BackendError(f"SSE_REDIS_URL {redact(url)!r} is not a Redis URL: {exc}") from None
    return client, subscriber


def open_publishing_pool(url: str, *, max_connections: int, timeout: float) -> redis.Redis:
    """The blocking client publishing runs on, in a thread: waiting for Redis there
    does not wait for turns of an event loop busy delivering (and the GIL is free
    meanwhile)."""
    return redis.Redis.from_pool(
        redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            retry=BlockingRetry(NoBackoff(), 1),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
    )


async def check_server(
    client: aioredis.Redis, subscriber: aioredis.Redis, init: AsyncScript, keys: Keys, where: str
) -> int:
    """Check the server (reachable, credentials, scripting, version) and return the
    head (``init`` starts the counter if Redis had none). On failure, close both
    clients and raise :class:`BackendError` saying what to fix."""
    try:
        await client.ping()
        info = await client.info("server")
        version = tuple(int(p) for p in str(info.get("redis_version", "0.0")).split(".")[:2])
        if version < MIN_REDIS_VERSION:
            raise BackendError(
                f"Redis at {where} is version {info.get('redis_version')}; the redis backend needs "
                f"{'.'.join(map(str, MIN_REDIS_VERSION))} or newer"
            )
        await client.eval("return 1", 0)
        return int(await init([keys.seq, keys.floor]))
    except BackendError:
        await close_clients(client, subscriber)
        raise
    except (RedisError, OSError) as exc:
        await close_clients(client, subscriber)
        raise _start_error(where, exc) from None


def _start_error(where: str, exc: RedisError | OSError) -> BackendError:
    if isinstance(exc, AuthenticationError):
        return BackendError(f"Redis at {where} refused the credentials ({exc}): fix the user/password in SSE_REDIS_URL")
    if isinstance(exc, NoPermissionError | ResponseError):
        if "auth" in str(exc).lower():
            return BackendError(
                f"Redis at {where} needs a password ({exc}): put it in SSE_REDIS_URL (redis://:password@host:port/0)"
            )
        return BackendError(
            f"Redis at {where} does not allow what the backend needs ({exc}): it must allow "
            "EVAL/EVALSHA, PUBLISH/SUBSCRIBE and the keys under SSE_REDIS_KEY_PREFIX"
        )
    return BackendError(f"cannot reach Redis at {where} ({exc}): check SSE_REDIS_URL and that the server is running")


async def close_clients(client: aioredis.Redis, subscriber: aioredis.Redis) -> None:
    await client.aclose()
    await subscriber.aclose()
