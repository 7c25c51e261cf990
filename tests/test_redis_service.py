"""Two services in one process (each its own uvicorn) sharing a real Redis: the
service's cluster features seen from inside — stats, send_to, limits, faults."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
from fastapi import Request
from helpers.apps import fast_settings, router_app, served
from helpers.redis import RedisServer
from helpers.servers import Served
from helpers.streams import RawResponse, open_stream, raw_request, soft_refusal, wait_until
from test_redis_faults import kill, private_redis, restart

from fastapi_sse import SSEService


def identify(request: Request) -> str | None:
    return request.query_params.get("user")


@contextmanager
def cluster(server: RedisServer, count: int = 2, **settings: Any) -> Iterator[list[tuple[Served, SSEService]]]:
    values: dict[str, Any] = {
        "backend": "redis",
        "redis_url": server.url,
        "redis_key_prefix": f"test:{uuid.uuid4().hex[:10]}:",
        "presence_interval": 0.2,
        "redis_timeout": 1.0,
        "redis_max_backoff": 0.1,
    }
    values.update(settings)
    with ExitStack() as stack:
        yield [
            stack.enter_context(served(router_app(fast_settings(**values), identify=identify, admin_dependencies=[])))
            for _ in range(count)
        ]


def test_send_to_and_cluster_stats_span_the_services(redis_server: RedisServer) -> None:
    with cluster(redis_server) as [(one, sse1), (two, sse2)], ExitStack() as stack:
        a = stack.enter_context(open_stream(one.url + "/subscribe", params={"channel": "x"}))
        stack.enter_context(open_stream(two.url + "/subscribe", params={"channel": "x"}))
        stack.enter_context(open_stream(two.url + "/subscribe", params={"channel": "y"}))
        (target,) = one.call(sse1.get_clients)
        assert two.call(sse2.send_to, target.id, "hello", {"from": "two"}) is True
        assert two.call(sse2.send_to, "not-a-client", "hello", 1) is False
        assert two.call(sse2.publish_to, "0" * 12 + "." + "0" * 32, "hello", 1) is not None
        event = a.next_event()
        assert (event.event, json.loads(event.data)) == ("hello", {"from": "two"})
        stats = wait_until(
            lambda: (s := one.call(sse1.cluster_stats)).workers == 2 and s.total_connections == 3 and s,
            message="both services in the cluster stats",
        )
        assert stats.scope == "cluster" and stats.by_channel == {"x": 2, "y": 1}
        assert stats.connects == 3 and stats.oldest_connection == target.created_at
        assert one.call(sse1.stats).total_connections == 1
        assert httpx.get(two.url + "/admin/connections", timeout=10).json()["workers"] == 2


def test_identity_limit_replaces_the_oldest_stream_on_the_other_service(redis_server: RedisServer) -> None:
    with (
        cluster(redis_server, max_connections_per_identity=1) as [(one, sse1), (two, sse2)],
        open_stream(one.url + "/subscribe", params={"user": "ann"}) as first,
        open_stream(two.url + "/subscribe", params={"user": "ann"}),
    ):
        assert first.rest() == []
        assert one.call(sse1.stats).disconnects == {"replaced": 1}
        assert len(two.call(sse2.get_clients)) == 1


def test_a_refused_identity_comes_back_once_the_slot_frees(redis_server: RedisServer) -> None:
    settings = {"max_connections_per_identity": 1, "identity_limit_policy": "refuse"}
    with cluster(redis_server, **settings) as [(one, sse1), (two, sse2)]:
        with open_stream(one.url + "/subscribe", params={"user": "bob"}):
            refused = httpx.get(two.url + "/subscribe", params={"user": "bob"}, timeout=10)
            assert "max_connections_per_identity" in soft_refusal(refused)
            assert two.call(sse2.stats).refused == {"max_connections_per_identity": 1}
        wait_until(lambda: not one.call(sse1.get_clients), message="the first stream to end")
        # Its slot is released on Redis: the same identity gets in again elsewhere.
        with open_stream(two.url + "/subscribe", params={"user": "bob"}) as again:
            assert again.response.status_code == 200


def test_redis_outage_ends_new_streams_and_a_data_loss_closes_the_others() -> None:
    with private_redis() as server, cluster(server, count=1) as [(one, sse)]:
        with open_stream(one.url + "/subscribe", params={"channel": "r"}) as stream:
            before = one.call(sse.publish, "r", "e", "before")
            assert stream.next_event().id == before
            kill(server)
            with open_stream(one.url + "/subscribe", params={"channel": "r"}, opened=False) as refused:
                assert refused.rest() == []
            assert one.call(sse.stats).disconnects == {"backend_unavailable": 1}
            restart(server)
            assert stream.rest() == []
        assert one.call(sse.stats).disconnects["backend_gap"] == 1
        with open_stream(
            one.url + "/subscribe", params={"channel": "r"}, headers={"Last-Event-ID": before}, opened=False
        ) as resumed:
            assert resumed.next_event().event == "gap"


BURST = 300


def test_a_burst_of_streams_beyond_the_connection_pool_waits_for_a_connection(redis_server: RedisServer) -> None:
    # A generous redis_timeout: the openings queue for the one connection, and a loaded
    # machine must not turn that wait into a backend outage.
    with cluster(redis_server, count=1, redis_max_connections=1, redis_timeout=5.0) as [(one, sse)]:
        # Every request is sent before any is answered: their openings all need Redis at once.
        socks = [raw_request(one.port, "/subscribe?channel=burst", read_response=False)[0] for _ in range(BURST)]
        try:
            for sock in socks:
                head = RawResponse(sock)
                assert head.status == 200
                assert b"\nid: " in head.read_until(b"\nid: ")
            assert len(one.call(sse.get_clients)) == BURST
        finally:
            for sock in socks:
                sock.close()
