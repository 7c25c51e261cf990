"""Bursts of fire-and-forget publishes, from a handler on the event loop and from a
thread, on both backends: every subscriber gets every event once and in order,
nothing is refused while the backend is reachable, and a client that reads at
network speed is not taken for a slow consumer. ``publish_many`` stores a batch in
order and validates all of it first."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from helpers.apps import fast_settings, router_app, served
from helpers.redis import RedisServer
from helpers.servers import Served
from helpers.streams import RawReader, dechunk, open_stream, parse, raw_request, wait_until
from httpx_sse import aconnect_sse

from fastapi_sse import InvalidChannelError, InvalidEventError, SSEDep, SSEService

STREAMS = 200
CHANNELS_PER_STREAM = 10
CHANNELS = STREAMS * CHANNELS_PER_STREAM
EVENTS = 50_000


def burst_app(**settings: Any) -> FastAPI:
    """The router, and two routes that publish ``n`` events round-robin over ``channels``
    channels ``c<k>`` (data: the event's index): from the handler on the event loop,
    without awaiting, and from a sync handler, which FastAPI runs in a thread."""
    app = router_app(fast_settings(max_channels_per_connection=CHANNELS_PER_STREAM, **settings))

    @app.post("/burst")
    async def burst(sse: SSEDep, n: int, channels: int, pad: int = 0) -> dict[str, int]:
        for i in range(n):
            sse.broadcast(f"c{i % channels}", "e", [i, "x" * pad])
        return {"published": n}

    @app.post("/burst_from_thread")
    def burst_from_thread(sse: SSEDep, n: int, channels: int, pad: int = 0) -> dict[str, int]:
        for i in range(n):
            sse.broadcast(f"c{i % channels}", "e", [i, "x" * pad])
        return {"published": n}

    return app


@contextmanager
def service(backend: str, request: pytest.FixtureRequest, **settings: Any) -> Iterator[tuple[Served, SSEService]]:
    if backend == "redis":
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        settings |= {
            "backend": "redis",
            "redis_url": redis_server.url,
            "redis_key_prefix": f"test:{uuid.uuid4().hex[:10]}:",
        }
    with served(burst_app(**settings)) as (server, sse):
        yield server, sse


async def receive_everything(url: str, route: str) -> dict[int, list[int]]:
    """Open STREAMS streams, stream k on channels c<k*10>..c<k*10+9>, then ask ``route``
    for the burst and read until each stream has its share; the indexes each got."""
    got: dict[int, list[int]] = {k: [] for k in range(STREAMS)}
    ready = [asyncio.Event() for _ in range(STREAMS)]
    share = EVENTS // STREAMS
    limits = httpx.Limits(max_connections=STREAMS + 10)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits) as client:

        async def read(k: int) -> None:
            channels = [f"c{k * CHANNELS_PER_STREAM + j}" for j in range(CHANNELS_PER_STREAM)]
            async with aconnect_sse(client, "GET", url + "/subscribe", params={"channel": channels}) as source:
                frames = source.aiter_sse()
                await anext(frames)  # retry hint
                await anext(frames)  # cursor
                ready[k].set()
                async for frame in frames:
                    got[k].append(json.loads(frame.data)[0])
                    if len(got[k]) == share:
                        return

        async with asyncio.timeout(120):
            readers = [asyncio.create_task(read(k)) for k in range(STREAMS)]
            await asyncio.gather(*(event.wait() for event in ready))
            response = await client.post(url + route, params={"n": EVENTS, "channels": CHANNELS})
            assert response.json() == {"published": EVENTS}
            await asyncio.gather(*readers)
    return got


@pytest.mark.parametrize("backend", ["memory", "redis"])
@pytest.mark.parametrize("route", ["/burst", "/burst_from_thread"])
def test_a_burst_reaches_every_subscriber_once_and_in_order(
    backend: str, route: str, request: pytest.FixtureRequest
) -> None:
    # 200 streams of 10 channels each: 2,000 channels, 25 events each, so neither
    # history nor the buffers (at their defaults) are what is tested; on Redis the
    # burst is 40,000 more events than publish_buffer_size used to hold.
    with service(backend, request) as (server, sse):
        got = asyncio.run(receive_everything(server.url, route))
        for k, indexes in got.items():
            mine = set(range(k * CHANNELS_PER_STREAM, (k + 1) * CHANNELS_PER_STREAM))
            assert indexes == [i for i in range(EVENTS) if i % CHANNELS in mine], k
        stats = sse.stats()
        assert stats.publish_failures == 0 and stats.pending_publishes == 0
        assert stats.events_published == EVENTS
        assert stats.slow_consumer_disconnects == 0 and stats.events_dropped == 0


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_burst_larger_than_the_buffer_does_not_cut_a_fast_reader(
    backend: str, request: pytest.FixtureRequest
) -> None:
    # Regression: the in-process backend delivered a whole burst from one handler
    # before any write could run, so 2 MB for one client overflowed its 256 KiB
    # buffer and a client reading at network speed was cut as a slow consumer.
    events, pad = 2000, 1000
    with service(backend, request) as (server, sse):
        assert sse.settings.max_buffer_bytes * 4 < events * pad
        sock, _ = raw_request(server.port, "/subscribe?channel=c0", read_response=False)
        reader = RawReader(sock, f"[{events - 1},".encode())
        reader.start()
        try:
            wait_until(lambda: b"id: " in reader.data, message="the stream to open")
            httpx.post(server.url + "/burst", params={"n": events, "channels": 1, "pad": pad}).raise_for_status()
            reader.join(60)
            assert not reader.is_alive() and not reader.eof
        finally:
            sock.close()
        head, _, body = reader.data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        received = [json.loads(e.data)[0] for e in parse(dechunk(body))]
        assert received == list(range(events))
        stats = sse.stats()
        assert stats.slow_consumer_disconnects == 0 and stats.events_dropped == 0
        assert stats.publish_failures == 0


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_publish_many_returns_ids_and_stores_in_order(backend: str, request: pytest.FixtureRequest) -> None:
    with service(backend, request) as (server, sse), ExitStack() as stack:
        stream = stack.enter_context(open_stream(server.url + "/subscribe", params={"channel": ["a", "b"]}))
        cursor = stream.last_event_id
        batch = [("a", "e", 0), ("b", "e", 1, "own-1"), ("a", "e", 2), ("nobody", "e", 3)]
        ids = server.call(sse.publish_many, batch)
        assert len(ids) == 4 and ids[1] == "own-1"
        numbered = [int(ids[0]), int(ids[2]), int(ids[3])]
        assert numbered == sorted(numbered) and int(ids[0]) > int(cursor)
        got = stream.events(3)
        assert [(e.id, e.json()) for e in got] == [(ids[0], 0), ("own-1", 1), (ids[2], 2)]
        replay = server.call(sse.backend.replay, ["a", "b"], int(cursor))
        assert [m.payload.decode().split("data: ")[1].strip() for m in replay.messages] == ["0", "1", "2"]
        assert server.call(sse.publish_many, []) == []

        # A bad event anywhere in the batch raises before any event is sent.
        for bad, error in (
            ([("a", "e", "sent?"), ("bad channel!", "e", 1)], InvalidChannelError),
            ([("a", "e", "sent?"), ("a", "bad\nname", 1)], InvalidEventError),
            ([("a", "e", "sent?"), ("a", "e", object())], InvalidEventError),
        ):
            with pytest.raises(error):
                server.call(sse.publish_many, bad)
        server.call(sse.publish_many, [("a", "e", "after")])
        assert stream.next_event().json() == "after"
        assert sse.stats().events_published == 5
