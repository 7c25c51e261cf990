"""What makes the workers sharing one Redis one service: the registry of live workers
and the groups capped across them (see :class:`~fastapi_sse.backends.base.Coordination`).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from fastapi_sse.backends._redis_keys import Keys
from fastapi_sse.backends._redis_scripts import CLAIM, PRESENCE_SCRIPTS
from fastapi_sse.backends.base import Coordination
from fastapi_sse.errors import BackendError


class RedisCoordination(Coordination):
    """Workers and capped groups on the Redis client of a started
    :class:`~fastapi_sse.backends.redis.RedisBackend`. ``where`` names the server in
    messages (the URL without its password)."""

    def __init__(self, keys: Keys, where: str) -> None:
        self._keys = keys
        self._where = where
        self._redis: aioredis.Redis | None = None
        self._claim_script: AsyncScript | None = None
        self._presence: dict[str, AsyncScript] = {}

    def attach(self, client: aioredis.Redis) -> None:
        """Use the started backend's client."""
        self._redis = client
        self._claim_script = client.register_script(CLAIM)
        self._presence = {name: client.register_script(source) for name, source in PRESENCE_SCRIPTS.items()}

    def detach(self) -> None:
        """The backend closed its client."""
        self._redis = self._claim_script = None
        self._presence = {}

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise BackendError("the redis backend is not started")
        return self._redis

    def _claim(self) -> AsyncScript:
        if self._claim_script is None:
            raise BackendError("the redis backend is not started")
        return self._claim_script

    async def announce(self, worker_id: str, info: bytes, ttl: float) -> bool:
        """Register a worker and its opaque ``info`` for ``ttl`` seconds; False when its
        registration was gone (first call, expired, or Redis lost its data)."""
        try:
            async with self._client().pipeline(transaction=False) as pipe:
                pipe.set(self._keys.worker(worker_id), info, px=max(1, round(ttl * 1000)), get=True)
                pipe.sadd(self._keys.workers, worker_id)
                previous, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not register worker on Redis at {self._where}: {exc}") from exc
        return previous is not None

    async def withdraw(self, worker_id: str) -> None:
        """Remove a worker's registration (at shutdown)."""
        async with self._client().pipeline(transaction=False) as pipe:
            pipe.delete(self._keys.worker(worker_id))
            pipe.srem(self._keys.workers, worker_id)
            await pipe.execute()

    async def peers(self) -> dict[str, bytes]:
        """The ``info`` of every worker whose registration has not expired."""
        client = self._client()
        try:
            members: set[bytes] = await client.smembers(self._keys.workers)  # type: ignore[assignment]
            workers = sorted(w.decode() for w in members)
            infos: list[bytes | None] = (
                await client.mget([self._keys.worker(w) for w in workers]) if workers else []  # type: ignore[assignment]
            )
            dead = [w for w, info in zip(workers, infos, strict=True) if info is None]
            if dead:
                await client.srem(self._keys.workers, *dead)
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not read workers from Redis at {self._where}: {exc}") from exc
        return {w: info for w, info in zip(workers, infos, strict=True) if info is not None}

    async def claim(self, group: str, member: str, limit: int, *, evict: bool) -> list[str] | None:
        """Add ``member`` (``<worker_id>.<rest>``) to a group capped at ``limit`` across
        every worker. When the group is full, remove and return its oldest members
        if ``evict``, else refuse and return None. Members of workers whose
        registration expired do not count (see ``lua/claim.lua``)."""
        try:
            result = await self._claim()(
                [self._keys.group(group)], [member, limit, "1" if evict else "0", self._keys.worker_prefix]
            )
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not update a shared limit on Redis at {self._where}: {exc}") from exc
        if result is None:
            return None
        return [m.decode() for m in result]

    async def release(self, group: str, member: str) -> None:
        """Remove ``member`` from a group made by :meth:`claim`."""
        try:
            await self._client().zrem(self._keys.group(group), member)
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not update a shared limit on Redis at {self._where}: {exc}") from exc

    async def reclaim(self, groups: dict[str, list[str]]) -> None:
        """Put members back in their groups where Redis lost them (``ZADD NX``: members
        still there keep their place), oldest first."""
        if not groups:
            return
        try:
            # Redis's clock, as the claim script uses: restored members stay older than newcomers.
            seconds, micros = await self._client().time()
            now = seconds * 1000 + micros // 1000
            async with self._client().pipeline(transaction=False) as pipe:
                for group, members in groups.items():
                    start = now - len(members)
                    pipe.zadd(self._keys.group(group), {m: start + i for i, m in enumerate(members)}, nx=True)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not restore shared limits on Redis at {self._where}: {exc}") from exc

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._presence.get(name)
        if script is None:
            raise BackendError("the redis backend is not started")
        try:
            return await script(keys, args)
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not update presence on Redis at {self._where}: {exc}") from exc

    async def present(self, channel: str, worker_id: str, identity: str, streams: int) -> tuple[int, int]:
        keys = self._keys
        args = [channel, worker_id, identity, streams, keys.worker_prefix]
        held = keys.presence_held_prefix + worker_id
        before, after = await self._script("present", [keys.presence(channel), keys.presence_workers, held], args)
        return int(before), int(after)

    async def presence(self, channel: str) -> dict[str, int]:
        flat = await self._script("presence", [self._keys.presence(channel)], [self._keys.worker_prefix])
        return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def absent(self) -> list[tuple[str, str]]:
        keys = self._keys
        prefixes = [keys.presence_prefix, keys.worker_prefix, keys.presence_held_prefix]
        flat = await self._script("absent", [keys.presence_workers], prefixes)
        return [(flat[i].decode(), flat[i + 1].decode()) for i in range(0, len(flat), 2)]
