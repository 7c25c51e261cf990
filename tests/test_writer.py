"""The service's writer: frames for parked streams are written by one task that runs
each stream's ASGI ``send`` by hand, handing sends that suspend or fail to the stream."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any

import httpx
from helpers.apps import fast_settings, router_app, served
from helpers.streams import open_stream, wait_until
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_sse import tune_gc


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
    app = router_app()
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
    app = router_app()
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


def test_many_parked_streams_each_get_a_broadcast() -> None:
    # More streams than the writer serves before letting other tasks run.
    with served(router_app(fast_settings(max_connections=2000))) as (srv, sse):

        async def add_parked(count: int) -> list[Any]:
            clients = []
            for _ in range(count):
                client, _ = sse.add_client()
                client._parked = True
                client._on_ready = sse._writer.add
                clients.append(client)
            return clients

        clients = srv.call(add_parked, 600)
        srv.call(sse.broadcast_all, "n", 1)
        # Streams without a response never started: the writer hands them back at once.
        wait_until(lambda: all(not c._parked for c in clients), message="every parked client to be woken")
        assert all(c.buffered_bytes for c in clients)


def test_tune_gc_freezes_startup_objects_and_raises_thresholds() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (50_000, 50, 100)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
