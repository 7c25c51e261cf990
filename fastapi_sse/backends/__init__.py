"""Backends carry events between processes and keep the history clients replay."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fastapi_sse.backends.base import (
    Backend,
    Coordination,
    Message,
    NoCoordination,
    Publication,
    Replay,
    RunLedger,
    RunState,
    Sink,
)
from fastapi_sse.backends.memory import MemoryBackend, MemoryRunLedger

if TYPE_CHECKING:
    from fastapi_sse.settings import SSESettings


def backend_for(settings: SSESettings) -> Backend:
    """The backend ``settings.backend`` names, configured by the settings."""
    if settings.backend == "memory":
        return MemoryBackend(history_size=settings.history_size, history_ttl=settings.history_ttl)
    if settings.backend == "redis":
        # Imported here: redis-py is an optional extra.
        redis_module = importlib.import_module("fastapi_sse.backends.redis")
        backend: Backend = redis_module.RedisBackend.from_settings(settings)
        return backend
    if settings.backend == "redis-cluster":
        cluster_module = importlib.import_module("fastapi_sse.backends.redis_cluster")
        sharded: Backend = cluster_module.RedisClusterBackend.from_settings(settings)
        return sharded
    raise ValueError(f"unknown backend {settings.backend!r}")  # pragma: no cover


__all__ = [
    "Backend",
    "Coordination",
    "MemoryBackend",
    "MemoryRunLedger",
    "Message",
    "NoCoordination",
    "Publication",
    "Replay",
    "RunLedger",
    "RunState",
    "Sink",
    "backend_for",
]
