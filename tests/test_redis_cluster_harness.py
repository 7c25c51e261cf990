"""The Redis Cluster the sharded tests run on: real redis-server nodes that serve keys,
fail over, move slots and carry sharded pub/sub the way a production cluster does."""

from __future__ import annotations

import socket
import time
import uuid
from typing import Any

import pytest
import redis
import redis.client
import redis.cluster
from helpers.redis_cluster import ClusterNode, RedisCluster, command, start_cluster


def tag() -> str:
    return uuid.uuid4().hex[:10]


def next_message(pubsub: redis.client.PubSub, timeout: float = 5.0) -> dict[str, Any]:
    """The next sharded pub/sub message (subscription changes included), within ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        message = pubsub.get_sharded_message(timeout=0.1)
        if message is not None:
            return dict(message)
    raise AssertionError(f"no sharded message within {timeout}s")


def subscribe(cluster: RedisCluster, node: ClusterNode, *channels: str) -> redis.client.PubSub:
    """A connection to ``node`` SSUBSCRIBEd to ``channels``, the confirmations read."""
    pubsub = cluster.pubsub_for(node, decode_responses=True)
    pubsub.ssubscribe(*channels)
    for channel in channels:
        assert next_message(pubsub)["channel"] == channel
    return pubsub


def channel_on(
    cluster: RedisCluster, master: ClusterNode | None, besides: str, not_on: ClusterNode | None = None
) -> str:
    """A channel of a slot other than ``besides``'s, served by ``master`` (or by any master but ``not_on``)."""
    for i in range(1000):
        channel = f"{{harness:{tag()}:{i}}}:events"
        if cluster.keyslot(channel) == cluster.keyslot(besides):
            continue
        owner = cluster.master_for_key(channel)
        if owner is master or (master is None and owner is not not_on):
            return channel
    raise AssertionError("no such channel among a thousand")


def raw_ssubscribe(port: int, channel: str) -> socket.socket:
    """A bare connection SSUBSCRIBEd to ``channel``: shows exactly what the server sends."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(f"*2\r\n$10\r\nSSUBSCRIBE\r\n${len(channel)}\r\n{channel}\r\n".encode())
    assert sock.recv(4096).startswith(b"*3\r\n$10\r\nssubscribe\r\n")
    return sock


def test_the_cluster_serves_keys_of_every_shard_through_a_cluster_client(redis_cluster: RedisCluster) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3 and len(redis_cluster.nodes) == 6
    assert all(len(redis_cluster.replicas_of(master)) == 1 for master in masters)
    assert redis_cluster.seed_url in [master.url for master in masters]
    assert len({node.pid for node in redis_cluster.nodes}) == 6

    client = redis.cluster.RedisCluster.from_url(redis_cluster.seed_url, decode_responses=True)
    with client:
        keys = [f"harness:{tag()}:{i}" for i in range(30)]
        for key in keys:
            client.set(key, key.upper())
        owners = {redis_cluster.master_for_key(key) for key in keys}
        assert owners == set(masters), "thirty keys spread over the three shards"
        for key in keys:
            assert client.get(key) == key.upper()
            with redis_cluster.client_for(redis_cluster.master_for_key(key), decode_responses=True) as node:
                assert node.get(key) == key.upper()
        assert redis_cluster.master_for_slot(redis_cluster.keyslot(keys[0])) is redis_cluster.master_for_key(keys[0])


def test_sharded_pubsub_reaches_subscribers_of_the_shard_also_from_a_script(redis_cluster: RedisCluster) -> None:
    channel = f"{{harness:{tag()}}}:events"
    owner = redis_cluster.master_for_key(channel)
    replica = redis_cluster.replicas_of(owner)[0]
    on_master = subscribe(redis_cluster, owner, channel)
    on_replica = subscribe(redis_cluster, replica, channel)
    publisher = redis_cluster.client_for(owner, decode_responses=True)

    assert command(publisher, "SPUBLISH", channel, "one") == 1
    # A script may SPUBLISH to a channel of its own slot, named in KEYS or only in ARGV.
    same_slot_key = channel.replace(":events", ":state")
    script = "redis.call('set', KEYS[1], ARGV[2]); return redis.call('spublish', ARGV[1], ARGV[2])"
    assert publisher.eval(script, 1, same_slot_key, channel, "two") == 1
    for pubsub in (on_master, on_replica):
        assert [next_message(pubsub)["data"] for _ in range(2)] == ["one", "two"]
    # Each command of a script is only checked against the node, not against the script's keys:
    # a channel of another slot the same master serves is accepted, one served elsewhere refused.
    assert publisher.eval(script, 1, same_slot_key, channel_on(redis_cluster, owner, channel), "three") == 0
    with pytest.raises(redis.ResponseError, match="non local key"):
        publisher.eval(script, 1, same_slot_key, channel_on(redis_cluster, None, channel, not_on=owner), "four")

    # Another master redirects the subscription to the owner.
    other = next(master for master in redis_cluster.masters() if master is not owner)
    wrong = redis_cluster.pubsub_for(other, decode_responses=True)
    wrong.ssubscribe(channel)
    with pytest.raises(redis.exceptions.MovedError):
        next_message(wrong)

    # redis-py's cluster pub/sub finds the owner itself.
    with redis_cluster.cluster_client(decode_responses=True) as client:
        sharded = client.pubsub()
        sharded.ssubscribe(channel)
        assert next_message(sharded)["type"] == "ssubscribe"
        # The count is of the master's subscribers only; the replica's get it all the same.
        assert client.spublish(channel, "five") == 2
        for pubsub in (sharded, on_master, on_replica):
            assert next_message(pubsub)["data"] == "five"
        sharded.close()
    for pubsub in (on_master, on_replica, wrong):
        pubsub.close()


def test_a_killed_master_fails_over_with_the_writes_its_replica_acknowledged(
    fresh_redis_cluster: RedisCluster,
) -> None:
    cluster = fresh_redis_cluster
    key = f"{{harness:{tag()}}}:kept"
    master = cluster.master_for_key(key)
    [replica] = cluster.replicas_of(master)
    with cluster.client_for(master) as direct:
        direct.set(key, "value")
        assert command(direct, "WAIT", 1, 1000) == 1
    subscriber = raw_ssubscribe(master.port, key)

    cluster.kill(master)
    # The subscriber's connection is closed under it, with no sunsubscribe first.
    assert subscriber.recv(4096) == b""
    subscriber.close()
    promoted = cluster.wait_failover(master)

    assert promoted is replica and promoted.role == "master"
    assert cluster.master_for_key(key) is promoted
    with cluster.client_for(promoted, decode_responses=True) as direct:
        assert direct.get(key) == "value"
    with cluster.cluster_client(decode_responses=True) as client:
        assert client.get(key) == "value"

    # Back on its port with no data, the old master becomes the promoted one's replica.
    cluster.restart(master)
    assert master.role == "replica" and master.master_id == promoted.node_id
    with cluster.client_for(master, decode_responses=True) as direct:
        command(direct, "READONLY")
        assert direct.get(key) == "value"


def test_migrate_slot_moves_keys_and_unsubscribes_the_old_masters_subscribers(
    fresh_redis_cluster: RedisCluster,
) -> None:
    cluster = fresh_redis_cluster
    prefix = f"{{harness:{tag()}}}"
    keys = [f"{prefix}:{i}" for i in range(250)]
    slot = cluster.keyslot(prefix)
    source = cluster.master_for_slot(slot)
    target = next(master for master in cluster.masters() if master is not source)
    with cluster.cluster_client(decode_responses=True) as client:
        for key in keys:
            client.set(key, key)
        channels = [f"{prefix}:events", f"{prefix}:other"]
        on_source = subscribe(cluster, source, *channels)
        on_source_replica = subscribe(cluster, cluster.replicas_of(source)[0], channels[0])

        assert cluster.migrate_slot(slot, target, batch=100) == len(keys)

        assert cluster.master_for_slot(slot) is target
        # The old master ends every subscription of the slot (and keeps the connection);
        # so does its replica.
        gone = [next_message(on_source) for _ in channels]
        assert [(m["type"], m["channel"]) for m in gone] == [("sunsubscribe", c) for c in channels]
        assert [m["data"] for m in gone] == [1, 0]
        assert next_message(on_source_replica)["type"] == "sunsubscribe"
        assert on_source.connection is not None
        with cluster.client_for(source) as old:
            assert old.ping()
            assert old.dbsize() == 0
            with pytest.raises(redis.exceptions.MovedError):
                old.get(keys[0])
        assert [client.get(key) for key in keys] == keys
        on_source.close()
        on_source_replica.close()


def test_a_manual_failover_unsubscribes_the_demoted_masters_subscribers(fresh_redis_cluster: RedisCluster) -> None:
    cluster = fresh_redis_cluster
    channel = f"{{harness:{tag()}}}:events"
    master = cluster.master_for_key(channel)
    [replica] = cluster.replicas_of(master)
    on_master = subscribe(cluster, master, channel)
    on_replica = subscribe(cluster, replica, channel)

    with cluster.client_for(replica) as direct:
        command(direct, "CLUSTER", "FAILOVER")
    cluster.wait_settled()

    assert cluster.master_for_key(channel) is replica and master.role == "replica"
    assert next_message(on_master)["type"] == "sunsubscribe"
    with cluster.client_for(replica) as direct:
        assert command(direct, "SPUBLISH", channel, "after") == 1
    # The promoted replica's subscriber stays subscribed: the next message is the publication.
    assert next_message(on_replica)["data"] == "after"
    on_master.close()
    on_replica.close()


def test_config_set_and_command_stats_cover_every_node(redis_cluster: RedisCluster) -> None:
    before = redis_cluster.command_stats().get("spublish", 0)
    with redis_cluster.cluster_client() as client:
        for i in range(5):
            client.spublish(f"harness:{tag()}:{i}", "x")
    assert redis_cluster.command_stats()["spublish"] == before + 5

    redis_cluster.config_set("slowlog-max-len", "64")
    try:
        for node in redis_cluster.nodes:
            with redis_cluster.client_for(node, decode_responses=True) as direct:
                assert direct.config_get("slowlog-max-len") == {"slowlog-max-len": "64"}
    finally:
        redis_cluster.config_set("slowlog-max-len", "128")


def test_a_missing_redis_server_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="redis-server is not installed"), start_cluster():
        pass
