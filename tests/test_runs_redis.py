"""Runs across worker processes on one real redis-server: a viewer on another worker,
the producer's worker killed, a cancel from another worker, history past the
channels' size, and the run ledger's contract on Redis and in memory."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from helpers.apps import fast_settings, router_app
from helpers.redis import RedisServer
from helpers.servers import free_port
from helpers.sinks import Inbox
from helpers.streams import open_stream
from httpx_sse import aconnect_sse
from test_redis_cluster import workers
from test_redis_faults import DURABLE, Cuttable, kill, private_redis, restart

from fastapi_sse import MemoryBackend, MemoryRunLedger, RunLedger, SSEService, get_sse_from_app
from fastapi_sse.backends.redis import RedisBackend


def start(url: str, count: int, pace: float = 0.0) -> str:
    response = httpx.post(url + "/runs", params={"count": count, "pace": pace}, timeout=10)
    assert response.status_code == 200, response.text
    run_id = response.json()["run_id"]
    assert isinstance(run_id, str)
    return run_id


def test_a_viewer_on_another_worker_gets_the_whole_run_and_its_end(redis_server: RedisServer) -> None:
    with workers(2, redis_server) as [(one, _), (two, _)]:
        run_id = start(one, 30, pace=0.005)
        with open_stream(two + f"/runs/{run_id}", opened=False) as viewer:
            events = viewer.rest()
        assert [e.json()["n"] for e in events[:-1]] == list(range(30))
        assert (events[-1].event, events[-1].json()) == ("end", {"status": "done", "result": {"tokens": 30}})
        # Resume from the middle on the producer's own worker: exactly the rest.
        with open_stream(one + f"/runs/{run_id}", opened=False, headers={"Last-Event-ID": events[9].id}) as again:
            assert [e.id for e in again.rest()] == [e.id for e in events[10:]]
        assert httpx.get(two + f"/runs/{run_id}", headers={"Last-Event-ID": events[-1].id}).status_code == 204


def test_the_producers_worker_killed_ends_the_run_as_lost_within_the_lease(redis_server: RedisServer) -> None:
    with workers(2, redis_server, run_lease=1.0, run_poll_interval=0.1) as [(one, producer), (two, _)]:
        run_id = start(one, 0, pace=0.05)
        with open_stream(two + f"/runs/{run_id}", opened=False) as viewer:
            assert viewer.next_event().event == "token"
            os.kill(producer.pid, signal.SIGKILL)
            killed = time.monotonic()
            rest = viewer.rest()
            waited = time.monotonic() - killed
        assert rest[-1].event == "end" and rest[-1].json() == {"status": "lost"}
        assert [e.event for e in rest[:-1]] == ["token"] * (len(rest) - 1)
        # Bounded: the lease, a poll, and a reader's read timeout far above both.
        assert waited < 5.0


def test_a_cancel_on_another_worker_stops_the_producer(redis_server: RedisServer) -> None:
    with workers(2, redis_server, run_poll_interval=0.05) as [(one, _), (two, _)]:
        run_id = start(one, 0, pace=0.01)
        with open_stream(two + f"/runs/{run_id}", opened=False) as viewer:
            assert viewer.next_event().event == "token"
            assert httpx.post(two + f"/runs/{run_id}/cancel", timeout=10).status_code == 202
            rest = viewer.rest()
        assert (rest[-1].event, rest[-1].json()) == ("end", {"status": "cancelled"})
        assert sum(e.event == "end" for e in rest) == 1


@pytest.fixture(params=["memory", "redis"])
def ledger(request: pytest.FixtureRequest) -> Any:
    if request.param == "memory":
        return MemoryRunLedger, None
    server: RedisServer = request.getfixturevalue("redis_server")
    return None, server


def test_the_run_ledger_contract(ledger: Any) -> None:
    make, server = ledger

    async def scenario() -> None:
        backend = None
        if make is not None:
            runs: RunLedger = make()
        else:
            backend = RedisBackend(server.url, key_prefix=f"test:{uuid.uuid4().hex[:10]}:")
            await backend.start(Inbox())
            assert backend.runs is not None
            runs = backend.runs
        try:
            assert await runs.state("r") is None
            assert await runs.begin("r", "w1", first=7, lease=0.2, retain=60)
            assert not await runs.begin("r", "w2", first=8, lease=0.2, retain=60)
            state = await runs.renew("r", "w1", lease=0.2)
            assert state is not None and state.live and not state.ended and not state.cancelled
            assert state.first == 7
            assert await runs.cancel("r")
            state = await runs.state("r")
            assert state is not None and state.cancelled
            # Another owner's renewal does not take the lease.
            other = await runs.renew("r", "w2", lease=60)
            assert other is not None and other.live
            await asyncio.sleep(0.3)  # the lease lapses: time is what is tested here
            state = await runs.state("r")
            assert state is not None and not state.live and not state.ended
            assert await runs.end("r", retain=60)
            assert not await runs.end("r", retain=60)
            state = await runs.state("r")
            assert state is not None and state.ended and not state.live
            assert not await runs.cancel("r")
            assert not await runs.begin("r", "w1", first=9, lease=1, retain=60)
            # An unknown run can be ended once (its store lost it).
            assert await runs.end("forgotten", retain=60)
            assert not await runs.end("forgotten", retain=60)
        finally:
            if backend is not None:
                await backend.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_publication_keeps_more_history_than_the_backends_size(kind: str, request: pytest.FixtureRequest) -> None:
    async def scenario() -> None:
        if kind == "memory":
            backend: Any = MemoryBackend(history_size=3)
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            backend = RedisBackend(server.url, key_prefix=f"test:{uuid.uuid4().hex[:10]}:", history_size=3)
        await backend.start(Inbox())
        try:
            long, short = [], []
            for n in range(10):
                long.append(await backend.publish("$run:long", str(n).encode(), None, store=True, history=8))
                short.append(await backend.publish("short", str(n).encode(), None, store=True))
            kept = await backend.replay(["$run:long"], long[1].seq)
            assert [m.payload for m in kept.messages] == [str(n).encode() for n in range(2, 10)]
            assert kept.gaps == frozenset()
            assert (await backend.replay(["$run:long"], long[0].seq)).gaps == frozenset({"$run:long"})
            assert (await backend.replay(["short"], short[1].seq)).gaps == frozenset({"short"})
            assert len((await backend.replay(["short"], short[6].seq)).messages) == 3
        finally:
            await backend.close()

    asyncio.run(scenario())


def test_a_run_survives_a_redis_restart_with_its_history() -> None:
    with private_redis(*DURABLE) as server:
        with workers(2, server, run_lease=10.0) as [(one, _), (two, _)]:
            run_id = start(one, 60, pace=0.02)
            with open_stream(two + f"/runs/{run_id}", opened=False) as viewer:
                seen = viewer.events(5)
                kill(server)
                restart(server, *DURABLE)
                seen += viewer.rest()
        assert [e.json()["n"] for e in seen[:-1]] == list(range(60))
        assert (seen[-1].event, seen[-1].json()) == ("end", {"status": "done", "result": {"tokens": 60}})
        ids = [int(e.id) for e in seen]
        assert ids == sorted(set(ids))


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on this event loop (beside a Cuttable network)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        get_sse_from_app(app).shutdown()
        server.should_exit = True
        await task


@pytest.mark.anyio
async def test_a_viewer_whose_subscription_drops_at_the_end_still_gets_it(redis_server: RedisServer) -> None:
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    common: dict[str, Any] = {"backend": "redis", "redis_key_prefix": prefix, "redis_max_backoff": 0.1}
    async with Cuttable(redis_server.port) as network:
        viewer_app = router_app(fast_settings(redis_url=network.url, redis_timeout=1, **common))
        producer = SSEService(fast_settings(redis_url=redis_server.url, **common))
        async with producer, serving(viewer_app) as url, httpx.AsyncClient(timeout=10) as http:
            run = await producer.runs.open()
            await run.send("token", 1)
            async with aconnect_sse(http, "GET", f"{url}/runs/{run.id}") as source:
                events = (e async for e in source.aiter_sse() if e.event in ("token", "end"))
                assert (await anext(events)).json() == 1
                network.cut()  # the viewer's worker loses Redis: its subscription drops
                await run.send("token", 2)
                await run.finish("ok")
                network.heal()
                rest = [(e.event, e.json()) async for e in events]
        assert rest == [("token", 2), ("end", {"status": "done", "result": "ok"})]
