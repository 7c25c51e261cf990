"""The service's writer: frames for parked streams are written by one task that runs
each stream's ASGI ``send`` by hand, handing sends that suspend or fail to the stream."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
import gc
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
from helpers.apps import fast_settings, router_app, served
from helpers.streams import open_stream, raw_request, wait_until
from sse_starlette.sse import EventSourceResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_sse import SSEClient, _writer, tune_gc
from fastapi_sse._counters import Counters
from fastapi_sse._writer import Outlet, Writer
from fastapi_sse.client import Frame
from fastapi_sse.stats import LATENCY_BUCKETS


class AwaitingSend:
    """A middleware whose ``send`` suspends once before sending; for ``?fail=1`` it
    raises (without suspending) when the body contains ``boom``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fail = scope["type"] == "http" and b"fail=1" in scope["query_string"]

        async def awaiting_send(message: Message) -> None:
            if fail and b"boom" in message.get("body", b""):
                raise RuntimeError("the send failed")
            await asyncio.sleep(0)
            await send(message)

        await self.app(scope, receive, awaiting_send)


def test_sends_that_suspend_are_finished_by_the_stream_in_order() -> None:
    # Inside its route, so that every write goes through the middleware that suspends.
    app = router_app(fast_settings(stream_outside_route=False))
    app.add_middleware(AwaitingSend)
    with served(app) as (srv, sse), open_stream(srv.url + "/subscribe", params={"channel": "c"}) as stream:

        def burst(start: int) -> None:
            for k in range(start, start + 10):
                sse.broadcast("c", "n", k)

        for start in range(0, 50, 10):
            srv.call(burst, start)
            assert [int(e.data) for e in stream.events(10)] == list(range(start, start + 10))
        # Counted once the send returns, which may be just after the bytes arrived.
        wait_until(lambda: sse.stats().events_sent == 50, message="every write to be counted")


def test_a_send_that_fails_ends_only_its_own_stream() -> None:
    app = router_app(fast_settings(stream_outside_route=False))
    app.add_middleware(AwaitingSend)
    url = "/subscribe"
    with (
        served(app) as (srv, sse),
        open_stream(srv.url + url, params={"channel": "c", "fail": "1"}) as failing,
        open_stream(srv.url + url, params={"channel": "c"}) as healthy,
    ):
        srv.call(sse.broadcast, "c", "n", "boom")
        assert healthy.next_event().data == '"boom"'
        wait_until(lambda: len(sse.get_clients()) == 1, message="the failed stream to be removed")
        with contextlib.suppress(httpx.HTTPError):  # a connection cut mid-stream also ends it
            failing.rest()
        srv.call(sse.broadcast, "c", "n", "after")
        assert healthy.next_event().data == '"after"'


def parked_client(client_id: str, writer: Writer) -> SSEClient:
    """A client whose stream is parked, as the writer finds it after a stream's opening."""
    client = SSEClient(
        client_id,
        created_at=datetime.now(UTC),
        last_event_id=None,
        identity=None,
        buffer_limit=1 << 20,
        policy="disconnect",
    )
    client.outlet = outlet = Outlet(client, writer)
    outlet.parked = True
    return client


def test_many_parked_streams_each_get_a_broadcast() -> None:
    # More streams than the writer serves before letting other tasks run.
    async def scenario() -> None:
        writer = Writer(Counters())
        running = asyncio.create_task(writer.run())
        clients = []
        for n in range(600):
            client = parked_client(f"c{n}", writer)
            clients.append(client)
        frame = Frame(1, "$all", b"data: 1\n\n")
        for client in clients:
            client.push(frame)
        await writer.settled()
        # Streams without a response to send to: the writer hands them back at once.
        assert all(c.outlet is not None and not c.outlet.parked for c in clients)
        assert all(c.buffered_bytes for c in clients)
        running.cancel()

    asyncio.run(scenario())


def test_the_writer_counts_every_write_in_its_latency_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes of frames that waited different times, interleaved, some exactly on a
    bucket's bound: each is counted once, in the bucket its own latency falls in. The
    writer's clock is held still, so that each latency is exactly the frame's age."""
    ages = [0.3, 3.0, 0.3, 0.06, 0.05, 0.06, 30.0, 0.0, 0.3, 10.0] * 70
    clock = 1000.0
    monkeypatch.setattr(_writer, "monotonic", lambda: clock)

    async def scenario() -> tuple[Counters, list[bytes]]:
        counters = Counters()
        writer = Writer(counters)
        running = asyncio.create_task(writer.run())
        written: list[bytes] = []

        async def send(message: Message) -> None:  # what an ASGI server's send does at once
            written.append(message["body"])

        for n, age in enumerate(ages):
            client = parked_client(f"c{n}", writer)
            assert client.outlet is not None
            client.outlet.send, client.outlet.context = send, contextvars.copy_context()
            client.push(Frame(n + 1, "c", b"data: %d\n\n" % n, clock - age))
        await writer.settled()
        running.cancel()
        return counters, written

    counters, written = asyncio.run(scenario())
    assert written == [b"data: %d\n\n" % n for n in range(len(ages))]
    assert counters.events_sent == len(ages)
    assert counters.bytes_sent == sum(map(len, written))
    expected = [0] * (len(LATENCY_BUCKETS) + 1)
    for age in ages:
        expected[bisect.bisect_left(LATENCY_BUCKETS, clock - (clock - age))] += 1
    assert counters.latency_buckets == expected
    assert counters.latency_sum == pytest.approx(sum(clock - (clock - age) for age in ages))


def test_tune_gc_freezes_startup_objects_and_raises_thresholds() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (50_000, 50, 100)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_an_open_stream_costs_no_task_beyond_the_servers_own() -> None:
    with served(router_app()) as (srv, sse):
        with open_stream(srv.url + "/subscribe", params={"channel": "warm"}):
            pass
        wait_until(lambda: not srv.call(sse.get_clients))
        baseline = int(srv.call(lambda: len(asyncio.all_tasks())))
        socks = []
        for _ in range(20):
            sock, head = raw_request(srv.port, "/subscribe?channel=c")
            assert head is not None and head.status == 200
            socks.append((sock, head))
        wait_until(
            lambda: (
                len(srv.call(sse.get_clients)) == 20
                and all(c.outlet is not None and c.outlet.parked for c in sse.get_clients())
            )
        )
        # uvicorn runs each request in one task; parked streams add none.
        assert srv.call(lambda: len(asyncio.all_tasks())) == baseline + 20
        srv.call(sse.broadcast, "c", "n", "to all")
        for _, head in socks:
            assert b'"to all"' in head.read_until(b'"to all"')
        victim = srv.call(sse.get_clients)[0]
        assert srv.call(sse.remove_client, victim.id)
        wait_until(lambda: srv.call(sse.stats).streaming == 19, message="the removed stream to end")
        for sock, _ in socks:
            sock.close()
        wait_until(lambda: not srv.call(sse.get_clients), message="disconnects noticed by parked streams")
        assert sse.stats().disconnects == {"client_closed": 20, "removed": 1}


def test_sse_response_answers_for_every_attribute_of_an_event_source_response() -> None:
    async def nothing() -> AsyncIterator[bytes]:
        yield b""

    reference = EventSourceResponse(nothing(), ping=0)
    with served(router_app()) as (srv, sse):
        _, response = srv.call(sse.add_client)
        for name, value in vars(reference).items():
            if name == "body_iterator":
                assert isinstance(getattr(response, name), AsyncIterator)
            elif name == "_send_lock":
                assert type(getattr(response, name)) is type(value)
            elif name == "raw_headers":
                # All of sse-starlette's but the hop-by-hop Connection, forbidden on HTTP/2.
                assert response.raw_headers == [h for h in value if h[0] != b"connection"]
            else:
                assert getattr(response, name) == value, name
        assert isinstance(response, EventSourceResponse)
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        response.headers["x-extra"] = "1"
        _, other = srv.call(sse.add_client)
        assert "x-extra" not in other.headers
