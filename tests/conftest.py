"""Shared fixtures: a real redis-server and a real Redis Cluster for the session, and an
HTTP client. What the tests import (servers, ports, redis-server, the cluster) lives in
the ``helpers`` package."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from helpers.redis import RedisServer, start_redis
from helpers.redis_cluster import RedisCluster, start_cluster


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the session, on its own port. Tests isolate by key prefix."""
    server = start_redis()
    try:
        yield server
    finally:
        server.proc.kill()
        server.proc.wait(10)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A real Redis Cluster for the session: 3 masters with a replica each, every node a
    redis-server of its own. Tests isolate by key prefix and leave the nodes running and
    the slots where they are; a test that kills, restarts or moves takes ``fresh_redis_cluster``."""
    with start_cluster(3, 1) as cluster:
        yield cluster


@pytest.fixture
def fresh_redis_cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster of the test's own (3 masters with a replica each), stopped after it."""
    with start_cluster(3, 1) as cluster:
        yield cluster


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client
