"""Presence through real servers and real SSE clients: who is on a channel, on every
worker, and the in-band ``presence`` events of joins and leaves, correct within a
lease after a worker is killed."""

from __future__ import annotations

import os
import signal
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from helpers.apps import fast_settings, router_app, served
from helpers.redis import RedisServer
from helpers.streams import Stream, open_stream, wait_until
from test_redis_cluster import workers

from fastapi_sse import SSEDep, sse_lifespan
from fastapi_sse.backends._redis_coordination import RedisCoordination
from fastapi_sse.backends._redis_keys import Keys


def identify(request: Request) -> str | None:
    return request.query_params.get("user")


def presence_of(stream: Stream) -> tuple[str, str, int]:
    event = stream.until_event("presence")[-1].json()
    return event["identity"], event["state"], event["streams"]


def test_joins_and_leaves_reach_who_asked_and_the_snapshot_adds_up() -> None:
    with served(router_app(fast_settings(presence=True), identify=identify)) as (srv, sse):
        url = srv.url + "/subscribe"
        with open_stream(url, params={"channel": "doc", "user": "watcher", "presence": "true"}) as watcher:
            with open_stream(url, params={"channel": "doc", "user": "alice"}):
                assert presence_of(watcher) == ("alice", "joined", 1)
                with open_stream(url, params={"channel": "doc", "user": "alice"}):
                    snapshot = srv.call(sse.presence.snapshot, "doc")
                    assert snapshot.members == {"watcher": 1, "alice": 2}
                # A second stream of one identity is no second join, nor its end a leave.
                with open_stream(url, params={"channel": "doc", "user": "bob"}):
                    assert presence_of(watcher) == ("bob", "joined", 1)
                assert presence_of(watcher) == ("bob", "left", 0)
            assert presence_of(watcher) == ("alice", "left", 0)
        wait_until(lambda: srv.call(sse.presence.snapshot, "doc").members == {}, message="everyone to leave")


def test_a_snapshot_cursor_starts_a_watcher_without_a_race() -> None:
    with served(router_app(fast_settings(presence=True), identify=identify)) as (srv, sse):
        url = srv.url + "/subscribe"
        with open_stream(url, params={"channel": "room", "user": "alice"}):
            snapshot = srv.call(sse.presence.snapshot, "room")
            assert snapshot.members == {"alice": 1}
            with open_stream(url, params={"channel": "room", "user": "bob"}):
                pass
            # Bob came and went after the snapshot: a watcher from its cursor sees both.
            params = {"channel": "lobby", "presence": "true", "last_event_id": snapshot.cursor}
            app_params = {**params, "channel": "room"}
            with open_stream(url, params=app_params, opened=False) as watcher:
                assert presence_of(watcher) == ("bob", "joined", 1)
                assert presence_of(watcher) == ("bob", "left", 0)


def test_an_apps_own_route_asks_for_presence_too() -> None:
    app = FastAPI(lifespan=sse_lifespan(fast_settings(presence=True)))

    @app.get("/watch")
    async def watch(sse: SSEDep, user: str, room: str) -> Any:
        client, response = sse.add_client(identity=user)
        sse.subscribe(client.id, room)
        assert sse.presence.watch(client.id, room)
        return response

    with served(app) as (srv, sse):
        with open_stream(srv.url + "/watch", params={"user": "w", "room": "r"}) as watcher:
            with open_stream(srv.url + "/watch", params={"user": "carol", "room": "r"}):
                assert presence_of(watcher) == ("carol", "joined", 1)
            assert presence_of(watcher) == ("carol", "left", 0)
        assert not srv.call(sse.presence.watch, "no-such-client", "r")


def test_presence_is_cluster_wide_and_a_killed_worker_leaves_within_its_lease(redis_server: RedisServer) -> None:
    with (
        workers(2, redis_server, presence_interval=0.2, presence=True) as [(one, _), (two, doomed)],
        open_stream(one + "/subscribe", params={"channel": "doc", "user": "w", "presence": "true"}) as watcher,
        open_stream(one + "/subscribe", params={"channel": "doc", "user": "alice"}),
        open_stream(two + "/subscribe", params={"channel": "doc", "user": "bob"}),
    ):
        # Through the shared backend the watcher's own join reaches it too.
        seen = {presence_of(watcher) for _ in range(3)}
        assert seen == {("w", "joined", 1), ("alice", "joined", 1), ("bob", "joined", 1)}
        for url in (one, two):
            members = httpx.get(url + "/presence", params={"channel": "doc"}).json()["members"]
            assert members == {"w": 1, "alice": 1, "bob": 1}
        os.kill(doomed.pid, signal.SIGKILL)
        # Its registration lapses after three presence intervals; the leave follows.
        assert presence_of(watcher) == ("bob", "left", 0)
        members = httpx.get(one + "/presence", params={"channel": "doc"}).json()["members"]
        assert members == {"w": 1, "alice": 1}


def test_presence_does_not_count_against_the_channel_limit() -> None:
    app = router_app(fast_settings(max_channels_per_connection=3, presence=True), identify=identify)
    with served(app) as (srv, sse):
        params = {"channel": ["a", "b", "c"], "user": "u", "presence": "true"}
        with open_stream(srv.url + "/subscribe", params=params):
            client = srv.call(sse.get_clients)[0]
            assert {"a", "b", "c"} <= client.channels


def test_presence_is_off_unless_asked_for_and_says_so() -> None:
    with served(router_app(identify=identify)) as (srv, _):
        response = httpx.get(srv.url + "/subscribe", params={"channel": "doc", "user": "u", "presence": "true"})
        assert response.status_code == 400 and "SSE_PRESENCE" in response.json()["detail"]


@pytest.mark.anyio
async def test_finding_who_left_reads_only_dead_workers_channels(redis_server: RedisServer) -> None:
    """At volume: thousands of channels with presence cost the periodic check one read
    per worker while every worker lives; a dead worker's channels are read once."""
    client = aioredis.Redis(port=redis_server.port)
    keys = Keys(f"pv{os.getpid()}:")
    coordination = RedisCoordination(keys, "test")
    coordination.attach(client)
    try:
        await coordination.announce("alive", b"{}", 60)
        await coordination.announce("doomed", b"{}", 60)
        for n in range(2000):
            await coordination.present(f"doc:{n}", "alive", "ann", 1)
            await coordination.present(f"doc:{n}", "doomed", "bob", 1)
        await client.config_resetstat()
        assert await coordination.absent() == []
        stats = await client.info("commandstats")
        assert "cmdstat_hgetall" not in stats, stats.get("cmdstat_hgetall")
        await coordination.withdraw("doomed")
        left = await coordination.absent()
        assert sorted(left) == sorted((f"doc:{n}", "bob") for n in range(2000))
        assert await coordination.absent() == []
        assert await coordination.presence("doc:7") == {"ann": 1}
    finally:
        coordination.detach()
        await client.aclose()
