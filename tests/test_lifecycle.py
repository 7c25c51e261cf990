"""Connection lifecycle: cleanup after disconnects, no leaks over many cycles, the lifespan."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from helpers.apps import fast_settings, router_app, served
from helpers.servers import serve
from helpers.streams import open_stream, raw_request, raw_stream, wait_until

from fastapi_sse import ALL_CHANNEL, SSEDep, SSEService, Text, allow_all, create_sse_router, get_sse_from_app
from fastapi_sse._names import client_channel

CYCLES = 1000
BATCH = 50


def task_count(srv: Any) -> int:
    return int(srv.call(lambda: len(asyncio.all_tasks())))


def test_closed_client_leaves_every_channel_promptly() -> None:
    with served(router_app()) as (srv, sse):
        with open_stream(srv.url + "/subscribe", params={"channel": ["a", "b"]}):
            client = wait_until(lambda: srv.call(sse.get_clients))[0]
            assert client.channels == {"a", "b"}
            assert srv.call(sse.get_clients_by_channel, client_channel(client.id)) == [client]
        wait_until(lambda: not srv.call(sse.get_clients), message="the client to be removed")
        for channel in ("a", "b", ALL_CHANNEL, client_channel(client.id)):
            assert srv.call(sse.get_clients_by_channel, channel) == []
        assert sse.stats().by_channel == {}
        assert client.closed and client.close_reason == "client_closed"
        assert sse.stats().disconnects == {"client_closed": 1}
        assert srv.call(sse.send_to, client.id, "e", 1) is False


def test_many_connect_disconnect_cycles_leave_nothing_behind() -> None:
    app = router_app(fast_settings(max_connections_per_identity=BATCH), identify=lambda r: r.headers.get("x-user"))
    with served(app) as (srv, sse):
        # Warm up once, so lazily created server tasks are in the baseline.
        with open_stream(srv.url + "/subscribe", params={"channel": "warm"}):
            pass
        wait_until(lambda: not srv.call(sse.get_clients))
        baseline = task_count(srv)
        for start in range(0, CYCLES, BATCH):
            socks = []
            for n in range(start, start + BATCH):
                path = f"/subscribe?channel=room-{n % 7}&channel=user-{n}"
                sock, head = raw_request(srv.port, path, {"x-user": f"user-{n % 3}"})
                assert head is not None and head.status == 200
                head.read_until(b"\n\nid: ")
                socks.append(sock)
            if start % (2 * BATCH):
                # Half the batches are removed by the server instead.
                for client in srv.call(sse.get_clients):
                    assert srv.call(sse.remove_client, client.id)
            for sock in socks:
                sock.close()
        wait_until(lambda: not srv.call(sse.get_clients), message="every client to be removed")
        wait_until(lambda: task_count(srv) <= baseline, message=f"tasks back to {baseline}")
        assert srv.call(sse.get_clients_by_channel, ALL_CHANNEL) == []
        assert [srv.call(sse.get_clients_by_identity, f"user-{n}") for n in range(3)] == [[], [], []]
        assert sse.stats().by_channel == {}
        stats = sse.stats()
        assert stats.connects == CYCLES + 1
        assert sum(stats.disconnects.values()) == CYCLES + 1
        assert stats.total_connections == 0


def test_head_request_gets_headers_and_leaves_no_client() -> None:
    app = router_app()

    @app.api_route("/events", methods=["GET", "HEAD"])
    async def events(sse: SSEDep) -> Any:
        client, response = sse.add_client()
        sse.subscribe(client.id, "h")
        return response

    with served(app) as (srv, sse), httpx.Client() as http:
        response = http.head(srv.url + "/events")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.content == b""
        assert srv.call(sse.get_clients) == []
        assert sse.stats().connects == 1


def test_client_gone_before_the_stream_starts_is_cleaned_up() -> None:
    app = router_app()

    with served(app) as (srv, sse):
        sock, _ = raw_request(srv.port, "/subscribe?channel=early", read_response=False)
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        with raw_stream(srv.port, "/subscribe?channel=later") as raw:
            raw.read_until(b"\n\nid: ")
        wait_until(lambda: not srv.call(sse.get_clients), message="both clients to be removed")


def test_router_lifespan_merges_with_the_apps_own() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def own(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        events.append("app-start")
        yield {"own": True}
        events.append("app-stop")

    app = FastAPI(lifespan=own)
    app.include_router(create_sse_router(fast_settings(), authorize=allow_all))
    with serve(app) as srv:
        sse = get_sse_from_app(app)
        assert sse.stats().total_connections == 0
        with open_stream(srv.url + "/subscribe", params={"channel": "m"}) as stream:
            srv.call(sse.broadcast, "m", "e", 1)
            assert stream.next_event().json() == 1
    assert events == ["app-start", "app-stop"]
    assert not hasattr(app.state, "sse")


def test_router_with_an_explicit_service() -> None:
    service = SSEService(fast_settings())
    app = FastAPI()
    app.include_router(create_sse_router(authorize=allow_all, service=service))
    with serve(app) as srv:
        assert get_sse_from_app(app) is service
        with open_stream(srv.url + "/subscribe", params={"channel": "x"}) as stream:
            srv.call(service.broadcast, "x", "e", "explicit")
            assert stream.next_event().json() == "explicit"
    assert service.get_clients() == []


def test_client_leaving_while_its_stream_is_blocked_in_a_send_ends_without_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Regression: the stream's task, cancelled because its client went away in the
    # middle of a blocked write, re-raised the cancellation and uvicorn logged
    # "Exception in ASGI application" with a traceback for every such client.
    with served(router_app()) as (srv, sse):
        server_log = logging.getLogger("uvicorn.error")
        server_log.addHandler(caplog.handler)
        try:
            sock, head = raw_request(srv.port, "/subscribe?channel=blocked", rcvbuf=4096)
            assert head is not None
            client = wait_until(lambda: srv.call(sse.get_clients_by_channel, "blocked"))[0]

            def publish() -> None:
                for _ in range(5):
                    sse.broadcast("blocked", "big", Text("x" * 30_000))

            while not srv.call(lambda: client.sending):
                srv.call(publish)
            sock.close()
            wait_until(lambda: client.closed and not srv.call(sse.get_clients), message="the client to be removed")
            wait_until(lambda: srv.call(sse.stats).streaming == 0, message="the stream to end")
        finally:
            server_log.removeHandler(caplog.handler)
        assert client.close_reason == "client_closed"
        assert "Exception in ASGI application" not in caplog.text
        assert "Traceback" not in caplog.text


def test_aclose_waits_for_streams_and_abandons_those_stuck_on_a_stalled_client() -> None:
    # Regression: aclose() returned as soon as shutdown() emptied the registry, not
    # when the streams had ended, and a stream blocked on a client that stopped
    # reading was left running.
    settings = fast_settings(max_buffer_bytes=8 * 1024 * 1024)
    with (
        served(router_app(settings)) as (srv, sse),
        open_stream(srv.url + "/subscribe", params={"channel": "reader"}) as reader,
    ):
        stalled, head = raw_request(srv.port, "/subscribe?channel=stalled", rcvbuf=4096)
        assert head is not None
        client = wait_until(lambda: srv.call(sse.get_clients_by_channel, "stalled"))[0]
        while not srv.call(lambda: client.sending):
            srv.call(lambda: [sse.broadcast("stalled", "big", Text("x" * 30_000)) for _ in range(5)])
        srv.call(sse.broadcast, "reader", "last", "before shutdown")
        srv.call(sse.aclose, 0.5)
        assert srv.call(sse.stats).streaming == 0
        got = reader.next_event()
        assert (got.event, got.json()) == ("last", "before shutdown")
        stalled.close()
