"""Runs' state on Redis (see :class:`~fastapi_sse.backends.base.RunLedger`): one hash
per run, ``<prefix>run:<id>``, whose fields say who holds its lease and until when
(the server's clock), whether it ended and whether it was asked to stop. The scripts
are in ``lua/run_*.lua``."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from fastapi_sse.backends._redis_scripts import RUN_SCRIPTS
from fastapi_sse.backends.base import RunLedger, RunState
from fastapi_sse.errors import BackendError


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _state(reply: Any) -> RunState | None:
    if not reply:
        return None
    live, ended, cancelled, first = (int(v) for v in reply)
    return RunState(live=bool(live), ended=bool(ended), cancelled=bool(cancelled), first=first)


class RedisRunLedger(RunLedger):
    """Runs' state on the Redis client of a started backend; ``where`` names the server
    in messages (the URL without its password)."""

    def __init__(self, prefix: str, where: str) -> None:
        self._prefix = prefix + "run:"
        self._where = where
        self._scripts: dict[str, AsyncScript] = {}

    def attach(self, client: aioredis.Redis) -> None:
        """Use the started backend's client."""
        self._scripts = {name: client.register_script(source) for name, source in RUN_SCRIPTS.items()}

    def detach(self) -> None:
        """The backend closed its client."""
        self._scripts = {}

    async def _run(self, name: str, run_id: str, *args: Any) -> Any:
        script = self._scripts.get(name)
        if script is None:
            raise BackendError("the redis backend is not started")
        try:
            return await script([self._prefix + run_id], list(args))
        except (RedisError, OSError) as exc:
            raise BackendError(f"could not {name} run {run_id!r} on Redis at {self._where}: {exc}") from exc

    async def begin(self, run_id: str, owner: str, *, first: int, lease: float, retain: float) -> bool:
        return bool(await self._run("begin", run_id, owner, _ms(lease), _ms(retain), first))

    async def renew(self, run_id: str, owner: str, *, lease: float) -> RunState | None:
        # Retained at least one lease more while it runs.
        return _state(await self._run("renew", run_id, owner, _ms(lease), _ms(lease)))

    async def cancel(self, run_id: str) -> bool:
        return bool(await self._run("cancel", run_id))

    async def end(self, run_id: str, *, retain: float) -> bool:
        return bool(await self._run("end", run_id, _ms(retain)))

    async def state(self, run_id: str) -> RunState | None:
        return _state(await self._run("state", run_id))
