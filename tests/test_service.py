"""The public API, exercised on a running service with real streams."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi import FastAPI, Request
from helpers.apps import fast_settings, own_route_app, router_app, served
from helpers.sinks import Inbox
from helpers.streams import open_stream, wait_until
from sse_starlette.sse import EventSourceResponse

from fastapi_sse import (
    ALL_CHANNEL,
    BackendError,
    BadRequestError,
    InvalidChannelError,
    MemoryBackend,
    Message,
    Replay,
    ServiceNotRunningError,
    SSEClient,
    SSEDep,
    SSEResponse,
    SSEService,
    get_sse,
    get_sse_from_app,
)


@pytest.fixture(scope="module")
def server() -> Any:
    with served(router_app()) as pair:
        yield pair


def only_client(srv: Any, sse: SSEService, channel: str) -> SSEClient:
    clients = wait_until(lambda: srv.call(sse.get_clients_by_channel, channel), message=f"a client on {channel}")
    assert len(clients) == 1
    client: SSEClient = clients[0]
    return client


def test_add_client_returns_client_and_event_source_response(server: Any) -> None:
    srv, sse = server
    before = datetime.now(UTC)
    client, response = srv.call(sse.add_client)
    try:
        assert isinstance(client, SSEClient)
        assert isinstance(response, SSEResponse)
        assert isinstance(response, EventSourceResponse)
        assert response.client is client
        assert isinstance(client.id, str) and client.id
        assert client.channels == set()
        assert isinstance(client.channels, set)
        assert client.created_at.tzinfo is not None
        assert before <= client.created_at <= datetime.now(UTC)
        assert client.last_event_id is None
        assert client.identity is None
        assert srv.call(sse.get_client, client.id) is client
        assert client in srv.call(sse.get_clients)
        assert repr(client) == f"SSEClient(id={client.id!r}, channels=[])"
    finally:
        assert srv.call(sse.remove_client, client.id) is True


def test_add_client_keeps_last_event_id_and_identity(server: Any) -> None:
    srv, sse = server
    client, _ = srv.call(lambda: sse.add_client("msg-9", identity="user-1"))
    empty, _ = srv.call(lambda: sse.add_client(""))
    try:
        assert client.last_event_id == "msg-9"
        assert client.identity == "user-1"
        assert empty.last_event_id is None
    finally:
        srv.call(sse.remove_client, client.id)
        srv.call(sse.remove_client, empty.id)


def test_subscribe_unsubscribe_results_and_channel_queries(server: Any) -> None:
    srv, sse = server
    a, _ = srv.call(sse.add_client)
    b, _ = srv.call(sse.add_client)
    try:
        assert srv.call(sse.subscribe, a.id, "room") is True
        assert srv.call(sse.subscribe, a.id, "room") is True  # already there
        assert srv.call(sse.subscribe, b.id, "room") is True
        assert srv.call(sse.subscribe, "no-such-client", "room") is False
        assert a.channels == {"room"}
        assert srv.call(sse.get_clients_by_channel, "room") == [a, b]
        assert srv.call(sse.get_clients_by_channel, "nobody-here") == []
        assert srv.call(sse.unsubscribe, a.id, "room") is True
        assert srv.call(sse.unsubscribe, a.id, "room") is False
        assert srv.call(sse.unsubscribe, "no-such-client", "room") is False
        assert srv.call(sse.get_clients_by_channel, "room") == [b]
        assert a.channels == set()
        # Internal channels reach every client without being listed among its channels.
        assert {c.id for c in srv.call(sse.get_clients_by_channel, ALL_CHANNEL)} >= {a.id, b.id}
        with pytest.raises(InvalidChannelError):
            srv.call(sse.subscribe, a.id, "$all")
    finally:
        srv.call(sse.remove_client, a.id)
        srv.call(sse.remove_client, b.id)
    assert srv.call(sse.remove_client, a.id) is False
    assert srv.call(sse.get_client, a.id) is None
    assert srv.call(sse.get_clients_by_channel, "room") == []


def test_broadcast_reaches_subscribers_only(server: Any) -> None:
    srv, sse = server
    with (
        open_stream(srv.url + "/subscribe", params={"channel": "news"}) as news,
        open_stream(srv.url + "/subscribe", params={"channel": "other"}) as other,
    ):
        srv.call(sse.broadcast, "news", "headline", {"title": "t"}, "news-1")
        srv.call(sse.broadcast, "other", "marker", 1)
        got = news.next_event()
        assert (got.event, got.json(), got.id) == ("headline", {"title": "t"}, "news-1")
        assert other.next_event().event == "marker"


def test_broadcast_all_and_send_to(server: Any) -> None:
    srv, sse = server
    with (
        open_stream(srv.url + "/subscribe", params={"channel": "s1"}) as one,
        open_stream(srv.url + "/subscribe", params={"channel": "s2"}) as two,
    ):
        first = only_client(srv, sse, "s1")
        srv.call(sse.broadcast_all, "announcement", {"all": True})
        assert one.next_event().event == "announcement"
        assert two.next_event().event == "announcement"
        assert srv.call(sse.send_to, first.id, "personal", {"to": "one"}, "msg-123") is True
        assert srv.call(sse.send_to, "gone", "personal", {}) is False
        srv.call(sse.broadcast, "s2", "marker", 0)
        got = one.next_event()
        assert (got.event, got.id, got.json()) == ("personal", "msg-123", {"to": "one"})
        assert two.next_event().event == "marker"  # nothing personal reached the other


def test_awaitable_publish_methods_return_ids(server: Any) -> None:
    srv, sse = server
    with open_stream(srv.url + "/subscribe", params={"channel": "aw"}) as stream:
        client = only_client(srv, sse, "aw")
        first = srv.call(sse.publish, "aw", "e", 1)
        own = srv.call(sse.publish, "aw", "e", 2, "mine-2")
        everyone = srv.call(sse.publish_all, "e", 3)
        direct = srv.call(sse.publish_to, client.id, "e", 4)
        assert srv.call(sse.publish_to, "gone", "e", 5) is None
        got = stream.events(4)
    assert first.isdigit() and everyone.isdigit() and direct.isdigit()
    assert own == "mine-2"
    assert int(first) < int(everyone) < int(direct)
    assert [(e.id, e.json()) for e in got] == [(first, 1), (own, 2), (everyone, 3), (direct, 4)]


def test_publish_from_another_thread_waits_for_the_backend(server: Any) -> None:
    srv, sse = server
    with open_stream(srv.url + "/subscribe", params={"channel": "thr"}) as stream:
        event_id = asyncio.run(sse.publish("thr", "e", "from a thread"))
        got = stream.next_event()
    assert (got.id, got.json()) == (event_id, "from a thread")


def test_unsubscribed_channel_stops_delivering(server: Any) -> None:
    srv, sse = server
    with open_stream(srv.url + "/subscribe", params={"channel": ["u1", "u2"]}) as stream:
        client = only_client(srv, sse, "u1")
        assert srv.call(sse.unsubscribe, client.id, "u1") is True
        srv.call(sse.broadcast, "u1", "lost", 1)
        srv.call(sse.subscribe, client.id, "u3")
        srv.call(sse.broadcast, "u3", "kept", 2)
        assert stream.next_event().event == "kept"


def test_remove_client_ends_stream_after_complete_events(server: Any) -> None:
    srv, sse = server
    with open_stream(srv.url + "/subscribe", params={"channel": "rm"}) as stream:
        client = only_client(srv, sse, "rm")

        def publish_then_remove() -> bool:
            for i in range(5):
                sse.broadcast("rm", "e", i)
            return sse.remove_client(client.id)

        assert srv.call(publish_then_remove) is True
        assert [e.json() for e in stream.rest()] == [0, 1, 2, 3, 4]
    assert srv.call(sse.get_client, client.id) is None
    assert sse.stats().disconnects["removed"] >= 1


def test_stats_and_connection_counts(server: Any) -> None:
    srv, sse = server
    with (
        open_stream(srv.url + "/subscribe", params={"channel": ["st-a", "st-b"]}),
        open_stream(srv.url + "/subscribe", params={"channel": "st-a"}),
    ):
        wait_until(lambda: len(srv.call(sse.get_clients_by_channel, "st-a")) == 2)
        stats = srv.call(sse.stats)
        cluster = srv.call(sse.cluster_stats)
    assert stats.scope == "worker" and stats.backend == "memory"
    assert stats.by_channel["st-a"] == 2 and stats.by_channel["st-b"] == 1
    assert stats.total_connections >= 2
    assert stats.oldest_connection is not None
    assert cluster.total_connections == stats.total_connections


def test_own_route_endpoint() -> None:
    with served(own_route_app()) as (srv, sse), open_stream(srv.url + "/events", params={"user": "42"}) as stream:
        wait_until(lambda: srv.call(sse.get_clients_by_channel, "user:42"))
        srv.call(sse.broadcast, "user:42", "notification", {"message": "You have a new message"})
        got = stream.next_event()
    assert (got.event, got.json()) == ("notification", {"message": "You have a new message"})


def test_client_whose_response_never_starts_is_removed() -> None:
    settings = fast_settings(heartbeat_interval=0.05, attach_timeout=0.05)
    with served(router_app(settings)) as (srv, sse):
        client, _ = srv.call(sse.add_client)
        wait_until(lambda: srv.call(sse.get_client, client.id) is None, message="the unattached client to go")
        assert sse.stats().disconnects["never_started"] == 1
        assert client.closed


def test_service_not_running_errors() -> None:
    sse = SSEService(fast_settings())
    for call in (
        sse.add_client,
        lambda: sse.broadcast("c", "e", 1),
        lambda: sse.broadcast_all("e", 1),
    ):
        with pytest.raises(ServiceNotRunningError, match="create_sse_router"):
            call()
    with pytest.raises(ServiceNotRunningError):
        asyncio.run(sse.publish("c", "e", 1))
    assert sse.send_to("nobody", "e", 1) is False


def test_service_as_async_context_manager_and_direct_api() -> None:
    async def scenario() -> None:
        async with SSEService(fast_settings()) as sse:
            await sse.start()  # a second start is harmless
            client, response = sse.add_client()
            assert sse.subscribe(client.id, "c")
            sse.broadcast("c", "e", 1)
            await sse.publish("c", "e", 2)
            assert client.buffered_bytes > 0
            assert sse.get_clients() == [client]
            sse.shutdown()
            assert sse.get_clients() == []
            assert client.closed and client.close_reason == "shutdown"
            assert isinstance(response, SSEResponse)
        await sse.aclose()  # closing twice is harmless
        with pytest.raises(ServiceNotRunningError):
            sse.add_client()

    asyncio.run(scenario())


class FailingBackend(MemoryBackend):
    async def publish(self, channel: str, payload: bytes, event_id: str | None, *, store: bool) -> Message:
        raise OSError("disk on fire")


class RefusingBackend(MemoryBackend):
    async def publish(self, channel: str, payload: bytes, event_id: str | None, *, store: bool) -> Message:
        raise BackendError("refused")


def test_publish_failures_raise_backend_error_and_are_counted() -> None:
    async def scenario(backend: MemoryBackend) -> None:
        async with SSEService(fast_settings(), backend=backend) as sse:
            with pytest.raises(BackendError):
                await sse.publish("c", "e", 1)
            assert sse.stats().publish_failures == 1

    asyncio.run(scenario(FailingBackend()))
    asyncio.run(scenario(RefusingBackend()))


def test_memory_backend_contract_directly() -> None:
    async def scenario() -> None:
        backend = MemoryBackend(history_size=2, history_ttl=60)
        inbox = Inbox()
        delivered = inbox.messages
        await backend.start(inbox)
        await backend.listen(["a"])
        first = await backend.publish("a", b"1", None, store=True)
        await backend.publish("a", b"2", "x-2", store=True)
        await backend.publish("b", b"3", None, store=False)
        await backend.publish("a", b"4", None, store=True)
        assert [m.seq for m in delivered] == [1, 2, 3, 4]
        assert await backend.head() == 4
        assert await backend.resolve("x-2", ["a"]) == 2
        assert await backend.resolve("3", ["a"]) == 3
        assert await backend.resolve("99", ["a"]) is None
        assert await backend.resolve("nope", ["a"]) is None
        replay = await backend.replay(["a", "b"], 2)
        assert isinstance(replay, Replay)
        assert [m.payload for m in replay.messages] == [b"4"]
        assert replay.gaps == frozenset()
        assert (await backend.replay(["a"], first.seq)).gaps == frozenset()  # 1 was trimmed, not missed
        assert (await backend.replay(["a"], 0)).gaps == {"a"}  # trimmed by count
        assert (await backend.replay(["a", "b"], None)).gaps == {"a", "b"}
        assert backend.publish_nowait("a", b"5", None, store=True).seq == 5
        await backend.unlisten(["a"])
        await backend.close()

    asyncio.run(scenario())


def test_app_without_service_explains_the_fix() -> None:
    app = FastAPI()
    with pytest.raises(ServiceNotRunningError, match="lifespan"):
        get_sse_from_app(app)
    request = Request({"type": "http", "app": app, "headers": []})
    with pytest.raises(ServiceNotRunningError) as info:
        asyncio.run(get_sse(request))
    assert "create_sse_router" in str(info.value)
    assert "sse_lifespan" in str(info.value)


def test_own_route_in_a_sync_handler() -> None:
    app = router_app()

    @app.get("/dashboard/live")
    def dashboard(sse: SSEDep) -> Any:
        # A plain def handler runs in the threadpool, off the event loop.
        client, response = sse.add_client()
        for channel in ("dashboard:stats", "dashboard:orders"):
            sse.subscribe(client.id, channel)
        sse.send_to(client.id, "initialData", {"orders": 0})
        return response

    with served(app) as (srv, sse), open_stream(srv.url + "/dashboard/live") as stream:
        first = stream.next_event()
        srv.call(sse.broadcast, "dashboard:orders", "newOrder", {"id": 1})
        second = stream.next_event()
    assert (first.event, first.json()) == ("initialData", {"orders": 0})
    assert (second.event, second.json()) == ("newOrder", {"id": 1})


def test_remove_client_from_a_sync_handler_ends_the_stream(http: Any) -> None:
    app = router_app()

    @app.post("/kick/{client_id}")
    def kick(client_id: str, sse: SSEDep) -> bool:
        # The "limit connections per user" best practice, in a threadpool handler.
        return sse.remove_client(client_id)

    with served(app) as (srv, sse), open_stream(srv.url + "/subscribe", params={"channel": "k"}) as stream:
        client = only_client(srv, sse, "k")
        srv.call(sse.broadcast, "k", "e", "last")
        assert http.post(f"{srv.url}/kick/{client.id}").json() is True
        assert [e.json() for e in stream.rest()] == ["last"]
        assert http.post(f"{srv.url}/kick/{client.id}").json() is False


def test_public_methods_from_other_threads_run_on_the_services_loop(http: Any) -> None:
    # Regression: called from a threadpool handler or a plain thread, these methods
    # completed the streams' asyncio futures off their loop (asyncio's debug mode
    # refuses that: "Non-thread-safe operation invoked on an event loop").
    app = router_app(fast_settings(max_connections=3))

    @app.post("/connect-and-kick")
    def connect_and_kick(sse: SSEDep) -> dict[str, Any]:
        client, _ = sse.add_client(identity="sync-user")
        results = [
            sse.subscribe(client.id, "a"),
            sse.subscribe(client.id, "b"),
            sse.unsubscribe(client.id, "b"),
            sse.send_to(client.id, "e", 1),
            sse.remove_client(client.id),
        ]
        return {"results": results, "channels": sorted(client.channels), "closed": client.closed}

    with served(app) as (srv, sse):
        srv.loop.set_debug(True)
        response = http.post(srv.url + "/connect-and-kick")
        assert response.status_code == 200, response.text
        assert response.json() == {"results": [True, True, True, True, True], "channels": ["a"], "closed": True}

        with open_stream(srv.url + "/subscribe", params={"channel": "t"}) as stream:
            client = only_client(srv, sse, "t")
            errors: list[BaseException] = []

            def job() -> None:
                try:
                    assert sse.subscribe(client.id, "t2")
                    sse.broadcast("t2", "e", "from a thread")
                    assert sse.remove_client(client.id)
                except BaseException as exc:
                    errors.append(exc)

            worker = threading.Thread(target=job)
            worker.start()
            worker.join()
            assert errors == []
            assert [e.json() for e in stream.rest()] == ["from a thread"]
        # Answers still reach the calling thread: past max_connections, a refused client.
        clients = [sse.add_client()[0] for _ in range(sse.settings.max_connections + 1)]
        assert [c.close_reason for c in clients[-2:]] == [None, "refused"]
        with pytest.raises(BadRequestError):  # errors too
            sse.add_client("bad\x00id")
        sse.shutdown()  # from the test's thread too
        assert sse.get_clients() == []
