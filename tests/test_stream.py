"""Publishing without ``await`` from every place an app publishes from, and fan-out order."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks
from helpers.apps import fast_settings, router_app, served
from helpers.streams import RawReader, dechunk, open_stream, parse, raw_request, wait_until

from fastapi_sse import SSEDep, get_sse_from_app

COUNT = 200


def publishing_app() -> Any:
    app = router_app()

    @app.post("/async")
    async def from_async(sse: SSEDep, n: int = COUNT) -> dict[str, int]:
        for i in range(n):
            sse.broadcast("feed", "tick", {"src": "async", "i": i})
        return {"sent": n}

    @app.post("/sync")
    def from_sync(sse: SSEDep, n: int = COUNT) -> dict[str, int]:
        # A plain def handler runs in the threadpool, off the event loop.
        assert threading.current_thread() is not threading.main_thread()
        for i in range(n):
            sse.broadcast("feed", "tick", {"src": "sync", "i": i})
        return {"sent": n}

    @app.post("/background")
    async def from_background(sse: SSEDep, tasks: BackgroundTasks, n: int = COUNT) -> dict[str, int]:
        def job() -> None:
            for i in range(n):
                sse.broadcast("feed", "tick", {"src": "background", "i": i})

        tasks.add_task(job)
        return {"sent": n}

    @app.post("/background-async")
    async def from_async_background(sse: SSEDep, tasks: BackgroundTasks, n: int = COUNT) -> dict[str, int]:
        async def job() -> None:
            for i in range(n):
                sse.broadcast_all("tick", {"src": "background-async", "i": i})

        tasks.add_task(job)
        return {"sent": n}

    return app


@pytest.fixture(scope="module")
def server() -> Any:
    with served(publishing_app()) as pair:
        yield pair


def by_source(events: list[Any]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = defaultdict(list)
    for event in events:
        payload = event.json()
        seen[payload["src"]].append(payload["i"])
    return seen


@pytest.mark.parametrize("path", ["/async", "/sync", "/background", "/background-async"])
def test_publish_without_await_from_handlers_and_tasks(server: Any, http: httpx.Client, path: str) -> None:
    srv, _ = server
    with open_stream(srv.url + "/subscribe", params={"channel": "feed"}) as stream:
        assert http.post(srv.url + path).json() == {"sent": COUNT}
        events = stream.events(COUNT)
    source = path.strip("/")
    assert by_source(events) == {source: list(range(COUNT))}
    ids = [int(e.id) for e in events]
    assert ids == sorted(ids)


def test_publish_without_await_from_a_plain_thread(server: Any) -> None:
    srv, sse = server
    app_sse = get_sse_from_app(srv.app)
    assert app_sse is sse

    def worker(name: str) -> None:
        for i in range(COUNT):
            sse.broadcast("feed", "tick", {"src": name, "i": i})

    with open_stream(srv.url + "/subscribe", params={"channel": "feed"}) as stream:
        threads = [threading.Thread(target=worker, args=(f"thread-{n}",)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        events = stream.events(3 * COUNT)
    assert by_source(events) == {f"thread-{n}": list(range(COUNT)) for n in range(3)}


def test_every_publisher_at_once_keeps_its_own_order(server: Any, http: httpx.Client) -> None:
    srv, sse = server

    def thread_worker() -> None:
        for i in range(COUNT):
            sse.broadcast("feed", "tick", {"src": "thread", "i": i})

    with (
        open_stream(srv.url + "/subscribe", params={"channel": "feed"}) as first,
        open_stream(srv.url + "/subscribe", params={"channel": ["feed", "other"]}) as second,
    ):
        thread = threading.Thread(target=thread_worker)
        thread.start()
        posters = [
            threading.Thread(target=http.post, args=(srv.url + path,)) for path in ("/async", "/sync", "/background")
        ]
        for poster in posters:
            poster.start()
        for worker in [thread, *posters]:
            worker.join()
        one = first.events(4 * COUNT)
        two = second.events(4 * COUNT)
    expected = {src: list(range(COUNT)) for src in ("thread", "async", "sync", "background")}
    assert by_source(one) == expected
    # Every subscriber sees the same interleaving: the frames are shared.
    assert [(e.id, e.data) for e in one] == [(e.id, e.data) for e in two]


def test_many_subscribers_get_identical_bytes(server: Any) -> None:
    srv, sse = server
    streams = [open_stream(srv.url + "/subscribe", params={"channel": "fan"}) for _ in range(8)]
    opened = [s.__enter__() for s in streams]
    try:
        wait_until(lambda: len(srv.call(sse.get_clients_by_channel, "fan")) == 8)
        for i in range(50):
            srv.call(sse.broadcast, "fan", "e", {"i": i})
        received = [[(e.id, e.event, e.data) for e in s.events(50)] for s in opened]
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    assert all(r == received[0] for r in received)
    assert [int(json_id) for json_id, _, _ in received[0]] == sorted(int(j) for j, _, _ in received[0])


def test_one_connection_carries_many_channels(server: Any) -> None:
    srv, sse = server
    channels = [f"multi-{n}" for n in range(10)]
    with open_stream(srv.url + "/subscribe", params={"channel": channels}) as stream:
        for channel in reversed(channels):
            srv.call(sse.broadcast, channel, "e", channel)
        got = [e.json() for e in stream.events(10)]
    assert got == list(reversed(channels))


def test_many_clients_each_get_every_event_in_order_under_load() -> None:
    # Regression: a burst published from threads was dispatched whole before any
    # write ran, so fast readers overflowed the default buffer and were disconnected.
    with served(router_app(fast_settings())) as (srv, sse):
        check_fan_out_under_load(srv, sse)


def check_fan_out_under_load(srv: Any, sse: Any) -> None:
    clients, events = 30, 1000
    sockets = [raw_request(srv.port, "/subscribe?channel=load") for _ in range(clients)]
    readers = [RawReader(sock, b"event: end\n") for sock, _ in sockets]
    try:
        wait_until(lambda: len(srv.call(sse.get_clients_by_channel, "load")) == clients)
        for reader in readers:
            reader.start()

        def publisher(name: str) -> None:
            for i in range(events // 2):
                sse.broadcast("load", "tick", {"src": name, "i": i, "pad": "p" * 1000})

        threads = [threading.Thread(target=publisher, args=(name,)) for name in ("x", "y")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        srv.call(sse.broadcast, "load", "end", None)
        for reader in readers:
            reader.join(30)
            assert not reader.is_alive()
    finally:
        for sock, _ in sockets:
            sock.close()
    first = None
    for (_, head), reader in zip(sockets, readers, strict=True):
        assert head is not None
        got = parse(dechunk(head.body + reader.data))
        ticks = [(e.id, e.data) for e in got if e.event == "tick"]
        assert len(ticks) == events, sse.stats()
        assert by_source([e for e in got if e.event == "tick"]) == {s: list(range(events // 2)) for s in "xy"}
        first = first or ticks
        assert ticks == first
    assert sse.stats().slow_consumer_disconnects == 0
