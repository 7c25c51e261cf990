"""Workers on a real local Redis Cluster (three masters, each with a replica): channels
sharded over the masters, and the guarantees of one Redis kept across them: fan-out,
one ``Last-Event-ID`` resuming every channel of a stream exactly, ``gap`` where
history no longer reaches, and no silent loss when a master dies."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
from helpers.eventsource import eventsource
from helpers.redis import RedisServer
from helpers.redis_cluster import RedisCluster, start_cluster
from helpers.servers import free_port, serve_process
from helpers.sinks import Inbox
from helpers.streams import Stream, open_stream, wait_until
from redis.crc import key_slot
from test_redis_cluster import cluster_env

from fastapi_sse import BackendError
from fastapi_sse.backends.base import Publication
from fastapi_sse.backends.redis_cluster import RedisClusterBackend

APP = "tests.apps.cluster:app"


def env_for(cluster: RedisCluster, prefix: str, **settings: Any) -> dict[str, str]:
    """``SSE_*`` variables of a worker on ``cluster``, as for one Redis otherwise."""
    return cluster_env(cluster.seed_url, prefix, **{"backend": "redis-cluster", **settings})


@contextmanager
def workers(count: int, cluster: RedisCluster, prefix: str = "", **settings: Any) -> Iterator[list[Any]]:
    """``count`` worker processes on ``cluster`` sharing a key prefix (a fresh one by default)."""
    env = env_for(cluster, prefix or f"t{uuid.uuid4().hex[:8]}:", **settings)
    with ExitStack() as stack:
        yield [stack.enter_context(serve_process(APP, env)) for _ in range(count)]


def publish(url: str, data: str, *, channel: str | None = None, to: str | None = None) -> str:
    params: dict[str, Any] = {"event": "e", "data": data, "wait": True}
    if channel is not None:
        params["channel"] = channel
    if to is not None:
        params["to"] = to
    response = httpx.post(url + "/publish", params=params, timeout=10)
    response.raise_for_status()
    body = response.json()
    assert "id" in body, body
    return str(body["id"])


def read_until(stream: Stream, last: str) -> list[str]:
    return [e.data for e in stream.until(lambda e: e.data == last)]


def spread(cluster: RedisCluster, prefix_free: list[str]) -> list[str]:
    """Channels of ``prefix_free`` names whose slots three different masters own."""
    found: dict[str, str] = {}
    for name in prefix_free:
        master = cluster.master_for_slot(key_slot(name.encode()))
        found.setdefault(str(master), name)
    return list(found.values())


def channels_on_every_master(cluster: RedisCluster) -> list[str]:
    names = spread(cluster, [f"room{i}" for i in range(200)])
    assert len(names) == 3, "three channels on three masters"
    return names


def test_fan_out_reaches_every_worker_once_across_masters(redis_cluster: RedisCluster) -> None:
    a, b, c = channels_on_every_master(redis_cluster)
    with workers(2, redis_cluster) as [(one, _), (two, _)], ExitStack() as stack:
        s1 = stack.enter_context(open_stream(one + "/subscribe", params={"channel": [a, b, c]}))
        s2 = stack.enter_context(open_stream(two + "/subscribe", params={"channel": [a, b]}))
        s3 = stack.enter_context(open_stream(two + "/own", params={"channel": [c]}))
        target = next(cid for cid, chans in httpx.get(two + "/local").json()["clients"].items() if chans == [c])
        publish(one, "a1", channel=a)
        publish(two, "b1", channel=b)
        publish(one, "c1", channel=c)
        publish(two, "all")
        publish(one, "direct", to=target)
        publish(one, "end")
        assert read_until(s1, '"end"') == ['"a1"', '"b1"', '"c1"', '"all"', '"end"']
        assert read_until(s2, '"end"') == ['"a1"', '"b1"', '"all"', '"end"']
        assert read_until(s3, '"end"') == ['"c1"', '"all"', '"direct"', '"end"']


@pytest.mark.parametrize("door", ["/subscribe", "/own"])
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "restarted"])
def test_one_last_event_id_resumes_channels_on_three_masters_exactly(
    redis_cluster: RedisCluster, how: signal.Signals, door: str
) -> None:
    a, b, c = channels_on_every_master(redis_cluster)
    with workers(2, redis_cluster) as [(one, proc_one), (two, _)]:
        with open_stream(one + door, params={"channel": [a, b, c]}) as stream:
            publish(two, "a1", channel=a)
            publish(one, "b1", channel=b)
            publish(two, "c1", channel=c)
            assert read_until(stream, '"c1"') == ['"a1"', '"b1"', '"c1"']
            cursor = stream.last_event_id
            proc_one.send_signal(how)
            proc_one.wait(10)
        for data, channel in [("b2", b), ("a2", a), ("x", "elsewhere"), ("c2", c)]:
            publish(two, data, channel=channel)
        publish(two, "all")
        assert cursor.startswith("p:")
        with open_stream(
            two + door, params={"channel": [a, b, c]}, headers={"Last-Event-ID": cursor}, opened=False
        ) as resumed:
            got = read_until(resumed, '"all"')
            assert sorted(got) == sorted(['"b2"', '"a2"', '"c2"', '"all"'])
            # Per channel, in order; nothing twice.
            publish(two, "live", channel=b)
            assert read_until(resumed, '"live"') == ['"live"']
            again = resumed.last_event_id
        # Resuming from the newest id replays nothing.
        publish(two, "after", channel=a)
        with open_stream(
            two + door, params={"channel": [a, b, c]}, headers={"Last-Event-ID": again}, opened=False
        ) as third:
            assert read_until(third, '"after"') == ['"after"']


def test_resume_reports_the_gap_history_no_longer_covers(redis_cluster: RedisCluster) -> None:
    a, keep, _ = channels_on_every_master(redis_cluster)
    with workers(1, redis_cluster, history_size=2) as [(one, _)]:
        with open_stream(one + "/subscribe", params={"channel": [a, keep]}) as stream:
            publish(one, "before", channel=keep)
            read_until(stream, '"before"')
            cursor = stream.last_event_id
        for i in range(3):
            publish(one, f"a{i}", channel=a)
        publish(one, "k", channel=keep)
        with open_stream(
            one + "/subscribe", params={"channel": [a, keep]}, headers={"Last-Event-ID": cursor}, opened=False
        ) as resumed:
            first = resumed.next_event()
            gap = resumed.next_event()
        assert first.data == '"k"'
        assert gap.event == "gap"
        assert json.loads(gap.data) == {"channels": [a], "all": False, "last_event_id": cursor}


def test_a_master_killed_its_replica_promoted_streams_go_on_and_lost_writes_are_a_gap(
    fresh_redis_cluster: RedisCluster,
) -> None:
    cluster = fresh_redis_cluster
    a, b, _ = channels_on_every_master(cluster)
    master = cluster.master_for_slot(key_slot(a.encode()))
    replica = cluster.replicas_of(master)[0]
    with workers(1, cluster) as [(one, _)]:
        with open_stream(one + "/subscribe", params={"channel": [a]}) as early:
            publish(one, "a1", channel=a)
            read_until(early, '"a1"')
            before = early.last_event_id
        with open_stream(one + "/subscribe", params={"channel": [a, b]}) as live:
            publish(one, "a2", channel=a)
            read_until(live, '"a2"')
            # The replica stops, and its master drops their link: what the master
            # acknowledges from now on is lost when it dies.
            os.kill(replica.pid, signal.SIGSTOP)
            admin = cluster.client_for(master)
            admin.client_kill_filter(_type="replica")
            admin.close()
            publish(one, "lost", channel=a)
            read_until(live, '"lost"')
            seen = live.last_event_id
            cluster.kill(master)
            os.kill(replica.pid, signal.SIGCONT)
            cluster.wait_failover(master)
            wait_until(lambda: httpx.get(one + "/local").json()["reconnects"] > 0, message="the worker to resubscribe")
            publish(one, "after", channel=a)
            publish(one, "b1", channel=b)
            assert read_until(live, '"b1"') == ['"after"', '"b1"']
        # A resume from before the lost event is told so; one from it goes on exactly.
        with open_stream(
            one + "/subscribe", params={"channel": [a, b]}, headers={"Last-Event-ID": before}, opened=False
        ) as resumed:
            got = list(resumed.until(lambda e: e.event == "gap"))
            # b, which that stream did not read, replays from where it was; a is a gap.
            assert [e.data for e in got[:-1]] == ['"b1"']
            assert json.loads(got[-1].data) == {"channels": [a], "all": False, "last_event_id": before}
        with open_stream(
            one + "/subscribe", params={"channel": [a, b]}, headers={"Last-Event-ID": seen}, opened=False
        ) as resumed:
            publish(one, "end", channel=b)
            assert read_until(resumed, '"end"') == ['"after"', '"b1"', '"end"']


def test_a_run_resumes_and_ends_across_workers(redis_cluster: RedisCluster) -> None:
    with workers(2, redis_cluster) as [(one, _), (two, _)]:
        response = httpx.post(one + "/runs", params={"count": 30, "pace": 0.005}, timeout=10)
        run_id = response.json()["run_id"]
        with open_stream(two + f"/runs/{run_id}", opened=False) as viewer:
            events = viewer.rest()
        assert [e.json()["n"] for e in events[:-1]] == list(range(30))
        assert (events[-1].event, events[-1].json()) == ("end", {"status": "done", "result": {"tokens": 30}})
        with open_stream(one + f"/runs/{run_id}", opened=False, headers={"Last-Event-ID": events[9].id}) as again:
            assert [e.data for e in again.rest()] == [e.data for e in events[10:]]
        assert httpx.get(two + f"/runs/{run_id}", headers={"Last-Event-ID": events[-1].id}).status_code == 204


def test_identity_limits_and_presence_hold_across_workers(redis_cluster: RedisCluster) -> None:
    settings = {"max_connections_per_identity": 2, "presence": True}
    doc = channels_on_every_master(redis_cluster)[0]
    with (
        workers(2, redis_cluster, **settings) as [(one, _), (two, _)],
        open_stream(one + "/subscribe", params={"user": "ann", "channel": doc}) as oldest,
        open_stream(two + "/subscribe", params={"user": "ann", "channel": doc}),
    ):
        snapshot = httpx.get(two + "/presence", params={"channel": doc}).json()
        assert snapshot["members"] == {"ann": 2}
        # The third stream, on worker two, closes the oldest, which is on worker one.
        with open_stream(two + "/subscribe", params={"user": "ann", "channel": doc}):
            assert oldest.rest() == []
            assert httpx.get(one + "/presence", params={"channel": doc}).json()["members"] == {"ann": 2}


def test_a_slot_moved_to_another_master_keeps_its_streams_and_history(fresh_redis_cluster: RedisCluster) -> None:
    cluster = fresh_redis_cluster
    a = channels_on_every_master(cluster)[0]
    slot = key_slot(a.encode())
    source = cluster.master_for_slot(slot)
    target = next(m for m in cluster.masters() if m != source)
    with workers(2, cluster) as [(one, _), (two, _)]:
        with open_stream(one + "/subscribe", params={"channel": [a]}) as stream:
            publish(two, "a1", channel=a)
            read_until(stream, '"a1"')
            cursor = stream.last_event_id
            assert cluster.migrate_slot(slot, target) > 0
            # Redis tells the subscriber its slot moved; it subscribes on the new owner.
            wait_until(lambda: httpx.get(one + "/local").json()["reconnects"] > 0, message="worker one to resubscribe")
            publish(two, "a2", channel=a)
            assert read_until(stream, '"a2"') == ['"a2"']
        with open_stream(
            two + "/subscribe", params={"channel": [a]}, headers={"Last-Event-ID": cursor}, opened=False
        ) as resumed:
            assert read_until(resumed, '"a2"') == ['"a2"']


@pytest.mark.parametrize("history", [1000, 5], ids=["caught-up", "gap"])
def test_a_worker_cut_off_as_a_slow_subscriber_catches_up_or_says_gap(history: int) -> None:
    # Redis drops a shard subscriber whose unread output passes 64 KiB.
    with start_cluster(3, 1, "--client-output-buffer-limit", "pubsub 64kb 32kb 1") as cluster:
        a = channels_on_every_master(cluster)[0]
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        # A big buffer: the stream itself keeps up with what the worker has read.
        settings = {"history_size": history, "max_buffer_bytes": 200_000_000}
        with workers(2, cluster, prefix=prefix, **settings) as [(one, slow), (two, _)]:
            with open_stream(one + "/subscribe", params={"channel": [a]}) as stream:
                publish(two, "first", channel=a)
                read_until(stream, '"first"')
                admin = cluster.client_for(cluster.master_for_slot(key_slot(a.encode())))
                route = prefix + "{" + a + "}"
                os.kill(slow.pid, signal.SIGSTOP)
                sent = 0
                try:
                    # The stopped worker reads nothing: its kernel buffers fill, then
                    # Redis's output buffer for it, and Redis cuts it off.
                    while admin.pubsub_shardnumsub(route)[0][1] > 0 and sent < 2000:
                        publish(two, f"{sent}:" + "x" * 16_000, channel=a)
                        sent += 1
                    # Then more than the small history holds.
                    for _ in range(10):
                        publish(two, f"{sent}:" + "x" * 16_000, channel=a)
                        sent += 1
                finally:
                    os.kill(slow.pid, signal.SIGCONT)
                    admin.close()
                assert sent < 2000, "Redis never cut the slow subscriber off"
                publish(two, "last", channel=a)
                if history > sent:
                    # History holds what the cut lost: the stream gets every event once, in order.
                    got = read_until(stream, '"last"')
                    assert [int(d.strip('"').partition(":")[0]) for d in got[:-1]] == list(range(sent))
                    assert httpx.get(one + "/local").json()["reconnects"] == 1
                    return
                rest = stream.rest()
            # What reached the worker before the cut is written, in order and once; then
            # the stream ends so that it resumes.
            numbers = [int(e.data.strip('"').partition(":")[0]) for e in rest if "x" in e.data]
            assert numbers == list(range(len(numbers))) and len(numbers) < sent
            assert httpx.get(one + "/local").json()["disconnects"].get("backend_gap") == 1
            cursor = rest[-1].id if rest else stream.last_event_id
            with open_stream(
                one + "/subscribe", params={"channel": [a]}, headers={"Last-Event-ID": cursor}, opened=False
            ) as resumed:
                got_gap = list(resumed.until(lambda e: e.event == "gap"))
                assert json.loads(got_gap[-1].data)["channels"] == [a]


def test_a_real_eventsource_resumes_every_channel_after_its_worker_restarts(redis_cluster: RedisCluster) -> None:
    a, b, c = channels_on_every_master(redis_cluster)
    env = env_for(redis_cluster, f"t{uuid.uuid4().hex[:8]}:")
    port = free_port()
    with serve_process(APP, env) as (other, _):
        with serve_process(APP, env, port=port) as (url, first):
            source = ExitStack()
            client = source.enter_context(
                eventsource(f"{url}/subscribe?channel={a}&channel={b}&channel={c}", "package")
            )
            client.expect("open")
            for data, channel in [("a1", a), ("b1", b), ("c1", c)]:
                publish(other, data, channel=channel)
                client.expect("e")
            first.send_signal(signal.SIGTERM)
            first.wait(10)
            # While no worker serves the page, every channel moves on.
            for data, channel in [("b2", b), ("c2", c), ("a2", a)]:
                publish(other, data, channel=channel)
        with serve_process(APP, env, port=port), source:
            # The client came back by itself, with the last id it saw.
            client.expect("open")
            for _ in range(3):
                client.expect("e")
            publish(other, "live", channel=b)
            client.expect("e")
    got = [json.loads(r["data"]) for r in client.of("e")]
    assert got[:3] == ["a1", "b1", "c1"]
    assert sorted(got[3:6]) == ["a2", "b2", "c2"] and got[6:] == ["live"]
    assert client.of("gap") == []
    resumed_from = [r["lastEventId"] for r in client.of("request") if r["lastEventId"]]
    assert resumed_from and all(i.startswith("p:") for i in resumed_from)


@pytest.mark.anyio
async def test_more_calls_than_connections_wait_for_one(redis_cluster: RedisCluster) -> None:
    backend = RedisClusterBackend(redis_cluster.seed_url, key_prefix=f"t{uuid.uuid4().hex[:8]}:", max_connections=4)
    await backend.start(Inbox())
    try:
        channels = [f"many{n}" for n in range(300)]
        messages = await backend.publish_many([Publication(c, b"data: x\n", None, True) for c in channels])
        assert [m.channel for m in messages] == channels
        again = await backend.replay_each({m.channel: m.seq - 1 for m in messages})
        assert sorted(m.channel for m in again.messages) == sorted(channels) and not again.gaps
    finally:
        await backend.close()


@pytest.mark.anyio
async def test_a_batch_sent_again_after_a_partial_failure_is_stored_once(redis_cluster: RedisCluster) -> None:
    a, b, c = channels_on_every_master(redis_cluster)
    backend = RedisClusterBackend(redis_cluster.seed_url, key_prefix=f"t{uuid.uuid4().hex[:8]}:", timeout=0.5)
    await backend.start(Inbox())
    admin = redis_cluster.client_for(redis_cluster.master_for_slot(key_slot(c.encode())))
    try:
        first = await backend.publish_many([Publication(ch, b"data: 0\n", None, True) for ch in (a, b, c)])
        batch = [Publication(ch, f"data: {n}\n".encode(), None, True) for n in (1, 2) for ch in (a, b, c)]
        # c's master takes no writes for a while: a and b store the batch, c's call fails.
        admin.client_pause(10_000, all=False)
        try:
            with pytest.raises(BackendError):
                await backend.publish_many(batch)
        finally:
            admin.client_unpause()
        # Sent again, as the outbox does: every event is stored once.
        await backend.publish_many(batch)
        replay = await backend.replay_each({m.channel: m.seq for m in first})
        stored = sorted((m.channel, m.payload) for m in replay.messages)
        assert stored == sorted((p.channel, p.payload) for p in batch)
    finally:
        admin.close()
        await backend.close()


@pytest.mark.anyio
async def test_a_wrong_url_says_what_to_fix(redis_server: RedisServer) -> None:
    for url in (redis_server.url, f"redis://127.0.0.1:{free_port()}"):
        backend = RedisClusterBackend(url, timeout=1)
        with pytest.raises(BackendError, match="cluster-enabled yes") as info:
            await backend.start(Inbox())
        assert "SSE_REDIS_URL" in str(info.value)
    with pytest.raises(BackendError, match="brace"):
        RedisClusterBackend(redis_server.url, key_prefix="app{1}:")
