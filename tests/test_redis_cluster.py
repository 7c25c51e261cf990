"""Several uvicorn workers (separate processes, own ports) on one real redis-server
become one service: fan-out, ids, resume, presence and limits hold across them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
import redis
from helpers.paths import ROOT
from helpers.redis import RedisServer
from helpers.servers import free_port, serve_process
from helpers.streams import Stream, open_stream, soft_refusal, wait_until

APP = "tests.apps.cluster:app"


def cluster_env(server: RedisServer | str, prefix: str, **settings: Any) -> dict[str, str]:
    """``SSE_*`` variables of a worker on ``server`` (or a URL); small intervals keep
    tests fast."""
    values: dict[str, Any] = {
        "backend": "redis",
        "redis_url": server if isinstance(server, str) else server.url,
        "redis_key_prefix": prefix,
        "retry_interval": 0.2,
        "retry_jitter": 0,
        "drain_window": 0,
        "heartbeat_interval": 60,
        "presence_interval": 0.2,
        "redis_timeout": 1,
        "redis_max_backoff": 0.2,
        "redis_health_interval": 1,
    }
    values.update(settings)
    return {f"SSE_{name.upper()}": str(value) for name, value in values.items()}


@contextmanager
def workers(count: int, server: RedisServer, **settings: Any) -> Iterator[list[Any]]:
    """``count`` worker processes sharing a fresh key prefix; yields [(url, process)]."""
    env = cluster_env(server, f"test:{uuid.uuid4().hex[:10]}:", **settings)
    with ExitStack() as stack:
        yield [stack.enter_context(serve_process(APP, env)) for _ in range(count)]


def publish(url: str, data: str, *, channel: str | None = None, to: str | None = None, wait: bool = True) -> Any:
    params: dict[str, Any] = {"event": "e", "data": data, "wait": wait}
    if channel is not None:
        params["channel"] = channel
    if to is not None:
        params["to"] = to
    response = httpx.post(url + "/publish", params=params, timeout=10)
    response.raise_for_status()
    return response.json()


def local(url: str) -> Any:
    return httpx.get(url + "/local", timeout=10).json()


def read_until(stream: Stream, last: str) -> list[tuple[str, str]]:
    """(id, data) of every event up to the one whose data is ``last``."""
    return [(e.id, e.data) for e in stream.until(lambda e: e.data == last)]


def client_on(url: str, channel: str) -> str:
    clients = local(url)["clients"]
    return next(cid for cid, channels in clients.items() if channel in channels)


def test_broadcast_broadcast_all_and_send_to_reach_every_worker_once(redis_server: RedisServer) -> None:
    with workers(2, redis_server) as [(one, _), (two, _)], ExitStack() as stack:
        a1 = stack.enter_context(open_stream(one + "/subscribe", params={"channel": "room"}))
        a2 = stack.enter_context(open_stream(one + "/subscribe", params={"channel": "room"}))
        b = stack.enter_context(open_stream(two + "/subscribe", params={"channel": "room"}))
        c = stack.enter_context(open_stream(two + "/subscribe", params={"channel": "other"}))
        target = client_on(two, "other")
        ids = [
            publish(one, "room-1", channel="room")["id"],
            publish(two, "room-2", channel="room")["id"],
            publish(one, "all-1")["id"],
            publish(one, "direct", to=target)["id"],
            publish(two, "end")["id"],
        ]
        assert all(ids) and [int(i) for i in ids] == sorted(int(i) for i in ids)
        room = [(ids[0], '"room-1"'), (ids[1], '"room-2"'), (ids[2], '"all-1"'), (ids[4], '"end"')]
        assert read_until(a1, '"end"') == room
        assert read_until(a2, '"end"') == room
        assert read_until(b, '"end"') == room
        assert read_until(c, '"end"') == [(ids[2], '"all-1"'), (ids[3], '"direct"'), (ids[4], '"end"')]


def test_one_subscription_per_worker_and_only_the_channels_its_clients_need(redis_server: RedisServer) -> None:
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    env = cluster_env(redis_server, prefix)
    r = redis.Redis(port=redis_server.port)
    with serve_process(APP, env) as (one, _), serve_process(APP, env) as (two, _), ExitStack() as stack:
        for _ in range(3):
            stack.enter_context(open_stream(one + "/subscribe", params={"channel": "busy"}))
        stack.enter_context(open_stream(two + "/subscribe", params={"channel": "busy"}))
        with open_stream(one + "/subscribe", params={"channel": "quiet"}):
            counts = dict(r.pubsub_numsub(prefix + "c:busy", prefix + "c:quiet", prefix + "c:$all"))
            assert counts == {
                f"{prefix}c:busy".encode(): 2,
                f"{prefix}c:quiet".encode(): 1,
                f"{prefix}c:$all".encode(): 2,
            }
            # Five clients, two workers: one Redis channel per worker for send_to.
            workers_channels = sorted(c for c in r.pubsub_channels(prefix + "w:*"))
            assert len(workers_channels) == 2
        wait_until(lambda: "quiet" not in local(one)["listening"], message="worker one to drop 'quiet'")
        wait_until(
            lambda: dict(r.pubsub_numsub(prefix + "c:quiet"))[f"{prefix}c:quiet".encode()] == 0,
            message="the Redis subscription to 'quiet' to end",
        )
    r.close()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "restarted"])
def test_one_last_event_id_resumes_several_channels_on_another_worker(
    redis_server: RedisServer, how: signal.Signals
) -> None:
    with workers(2, redis_server) as [(one, proc_one), (two, _)]:
        with open_stream(one + "/subscribe", params={"channel": ["a", "b"]}) as stream:
            publish(two, "a1", channel="a")
            publish(one, "b1", channel="b")
            seen = read_until(stream, '"b1"')
            cursor = stream.last_event_id
            proc_one.send_signal(how)
            proc_one.wait(10)
            missed = [
                publish(two, "a2", channel="a")["id"],
                publish(two, "ignored", channel="c")["id"],
                publish(two, "b2", channel="b")["id"],
                publish(two, "all", wait=True)["id"],
                publish(two, "a3", channel="a")["id"],
            ]
        assert [d for _, d in seen] == ['"a1"', '"b1"']
        with open_stream(
            two + "/subscribe", params={"channel": ["a", "b"]}, headers={"Last-Event-ID": cursor}, opened=False
        ) as resumed:
            got = read_until(resumed, '"a3"')
            assert got == [(missed[0], '"a2"'), (missed[2], '"b2"'), (missed[3], '"all"'), (missed[4], '"a3"')]
            live = publish(two, "live", channel="b")["id"]
            assert read_until(resumed, '"live"') == [(live, '"live"')]


def test_resume_on_another_worker_reports_the_gap_history_no_longer_covers(redis_server: RedisServer) -> None:
    with workers(2, redis_server, history_size=2) as [(one, _), (two, _)]:
        cursor = publish(one, "before", channel="keep")["id"]
        for i in range(3):
            publish(one, f"a{i}", channel="a")
        kept = publish(two, "k", channel="keep")["id"]
        with open_stream(
            two + "/subscribe", params={"channel": ["a", "keep"]}, headers={"Last-Event-ID": cursor}, opened=False
        ) as resumed:
            first = resumed.next_event()
            gap = resumed.next_event()
        assert (first.id, first.data) == (kept, '"k"')
        assert gap.event == "gap"
        assert json.loads(gap.data) == {"channels": ["a"], "all": False, "last_event_id": cursor}


def test_cluster_stats_count_live_workers_and_forget_killed_ones(redis_server: RedisServer) -> None:
    with workers(2, redis_server) as [(one, proc_one), (two, _)], ExitStack() as stack:
        stack.enter_context(open_stream(one + "/subscribe", params={"channel": "s"}))
        stack.enter_context(open_stream(two + "/subscribe", params={"channel": "s"}))
        stack.enter_context(open_stream(two + "/subscribe", params={"channel": "t"}))

        def stats() -> Any:
            return httpx.get(two + "/admin/connections", timeout=10).json()

        full = wait_until(lambda: (s := stats())["total_connections"] == 3 and s, message="both workers counted")
        assert full["scope"] == "cluster" and full["workers"] == 2
        assert full["by_channel"] == {"s": 2, "t": 1}
        assert local(two)["clients"] and len(local(two)["clients"]) == 2
        proc_one.send_signal(signal.SIGKILL)
        proc_one.wait(10)
        alone = wait_until(lambda: (s := stats())["workers"] == 1 and s, message="the killed worker to expire")
        assert alone["total_connections"] == 2 and alone["by_channel"] == {"s": 1, "t": 1}


def test_identity_limit_holds_across_workers(redis_server: RedisServer) -> None:
    with (
        workers(2, redis_server, max_connections_per_identity=2) as [(one, _), (two, _)],
        open_stream(one + "/subscribe", params={"user": "ann"}) as oldest,
        open_stream(two + "/subscribe", params={"user": "ann"}),
        # The third stream, on worker two, closes the oldest, which is on worker one.
        open_stream(two + "/subscribe", params={"user": "ann"}),
    ):
        assert oldest.rest() == []
        wait_until(lambda: not local(one)["clients"], message="the oldest stream to close")
        assert local(one)["disconnects"] == {"replaced": 1}
        assert len(local(two)["clients"]) == 2


def test_refuse_policy_refuses_softly_on_any_worker(redis_server: RedisServer) -> None:
    settings = {"max_connections_per_identity": 1, "identity_limit_policy": "refuse"}
    with workers(2, redis_server, **settings) as [(one, _), (two, _)]:
        with open_stream(one + "/subscribe", params={"user": "bob"}):
            refused = httpx.get(two + "/subscribe", params={"user": "bob"}, timeout=10)
            assert "max_connections_per_identity" in soft_refusal(refused)
            assert not local(two)["clients"]
        # Once the first stream is gone its slot is free again, on any worker.
        wait_until(lambda: not local(one)["clients"], message="the first stream to end")
        with open_stream(two + "/subscribe", params={"user": "bob"}) as again:
            assert again.response.status_code == 200


def test_a_worker_with_a_wrong_redis_url_exits_at_startup_saying_what_to_fix(redis_server: RedisServer) -> None:
    port = free_port()
    env = {**os.environ, **cluster_env(redis_server, "test:bad:", redis_url=f"redis://127.0.0.1:{free_port()}/0")}
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", APP, "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "cannot reach Redis at redis://127.0.0.1:" in done.stderr
    assert "check SSE_REDIS_URL" in done.stderr
