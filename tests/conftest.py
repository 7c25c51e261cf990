"""Shared fixtures: a real redis-server for the session and an HTTP client. What the
tests import (servers, ports, redis-server) lives in the ``helpers`` package."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from helpers.redis import RedisServer, start_redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the session, on its own port. Tests isolate by key prefix."""
    server = start_redis()
    try:
        yield server
    finally:
        server.proc.kill()
        server.proc.wait(10)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client
