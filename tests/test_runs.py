"""Runs through real servers and real SSE clients: a producer's events that viewers
follow from the start or their Last-Event-ID, to exactly one terminal event."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from helpers.apps import fast_settings, router_app, served
from helpers.streams import open_stream, parse, raw_request, wait_until

from fastapi_sse import (
    RunCancelled,
    RunExistsError,
    SSEDep,
    SSEService,
    Text,
    allow_all,
    create_sse_router,
    sse_lifespan,
)


def producer_app(settings: Any = None, *, own_route: bool = False) -> FastAPI:
    """An app whose POST /runs starts a run that sends what the test releases, one
    event per ``step`` call; the viewer's route is the router's, or the app's own."""
    settings = settings or fast_settings()
    if own_route:
        app = FastAPI(lifespan=sse_lifespan(settings))

        @app.get("/mine/{run_id}")
        async def view(run_id: str, sse: SSEDep) -> Any:
            return await sse.runs.stream(run_id)

    else:
        app = router_app(settings)
    app.state.steps = {}

    @app.post("/runs")
    async def start(request: Request, sse: SSEDep, count: int, run_id: str | None = None) -> dict[str, str]:
        run = await sse.runs.open(run_id)
        steps: asyncio.Queue[str] = asyncio.Queue()
        app.state.steps[run.id] = steps

        async def produce() -> None:
            async with run:
                for n in range(count):
                    command = await steps.get()
                    if command == "fail":
                        raise RuntimeError("the model broke")
                    await run.send("token", {"n": n})
                await steps.get()
                await run.finish({"tokens": count})

        app.state.task = asyncio.get_running_loop().create_task(produce())
        return {"run_id": run.id}

    return app


def step(srv: Any, app: FastAPI, run_id: str, times: int = 1, command: str = "go") -> None:
    for _ in range(times):
        srv.call(app.state.steps[run_id].put_nowait, command)


def start(srv: Any, count: int, run_id: str | None = None) -> str:
    params: dict[str, Any] = {"count": count}
    if run_id is not None:
        params["run_id"] = run_id
    response = httpx.post(srv.url + "/runs", params=params)
    assert response.status_code == 200, response.text
    run_id = response.json()["run_id"]
    assert isinstance(run_id, str)
    return run_id


def finished(srv: Any, app: FastAPI, count: int) -> str:
    run_id = start(srv, count)
    step(srv, app, run_id, count + 1)
    srv.call(lambda: asyncio.wait_for(asyncio.shield(app.state.task), 5))
    return run_id


@pytest.mark.parametrize("own_route", [False, True], ids=["router", "own-route"])
def test_a_viewer_gets_the_run_from_its_start_live_then_one_end(own_route: bool) -> None:
    app = producer_app(own_route=own_route)
    with served(app) as (srv, sse):
        run_id = start(srv, 4)
        step(srv, app, run_id, 2)
        url = srv.url + (f"/mine/{run_id}" if own_route else f"/runs/{run_id}")
        with open_stream(url, opened=False) as viewer:
            assert [e.json()["n"] for e in viewer.events(2)] == [0, 1]
            step(srv, app, run_id, 3)
            rest = viewer.rest()
        assert [e.event for e in rest] == ["token", "token", "end"]
        assert rest[-1].json() == {"status": "done", "result": {"tokens": 4}}
        assert viewer.ended
        # A reconnect after the end (what EventSource does) is told to stop: 204.
        after = httpx.get(url, headers={"Last-Event-ID": rest[-1].id})
        assert after.status_code == 204
        assert sse.stats().disconnects.get("run_ended") == 1


@pytest.mark.parametrize("own_route", [False, True], ids=["router", "own-route"])
def test_resume_at_every_offset_of_a_run_gives_exactly_the_rest(own_route: bool) -> None:
    app = producer_app(own_route=own_route)
    with served(app) as (srv, _):
        run_id = finished(srv, app, 6)
        url = srv.url + (f"/mine/{run_id}" if own_route else f"/runs/{run_id}")
        with open_stream(url, opened=False) as whole:
            events = whole.rest()
        assert [e.event for e in events] == ["token"] * 6 + ["end"]
        for k, event in enumerate(events[:-1]):
            with open_stream(url, opened=False, headers={"Last-Event-ID": event.id}) as resumed:
                rest = resumed.rest()
            assert [e.id for e in rest] == [e.id for e in events[k + 1 :]]


def test_a_cancel_reaches_the_producer_which_ends_the_run_as_cancelled() -> None:
    app = producer_app(fast_settings(run_poll_interval=0.05))
    with served(app) as (srv, _):
        run_id = start(srv, 100)
        step(srv, app, run_id)
        with open_stream(srv.url + f"/runs/{run_id}", opened=False) as viewer:
            assert viewer.next_event().json() == {"n": 0}
            assert httpx.post(srv.url + f"/runs/{run_id}/cancel").status_code == 202
            step(srv, app, run_id)  # the producer's next send raises RunCancelled
            rest = viewer.rest()
        assert [(e.event, e.json()) for e in rest] == [("end", {"status": "cancelled"})]
        assert httpx.post(srv.url + f"/runs/{run_id}/cancel").status_code == 404


def test_a_producer_that_raises_ends_its_run_as_failed() -> None:
    app = producer_app()
    with served(app) as (srv, _):
        run_id = start(srv, 3)
        step(srv, app, run_id)
        step(srv, app, run_id, command="fail")
        with open_stream(srv.url + f"/runs/{run_id}", opened=False) as viewer:
            events = viewer.rest()
        assert [e.event for e in events] == ["token", "end"]
        assert events[-1].json() == {"status": "failed", "error": "the model broke"}


def test_a_run_id_is_never_reused_while_it_is_retained() -> None:
    app = producer_app()
    with served(app) as (srv, sse):
        run_id = finished(srv, app, 1)
        assert httpx.post(srv.url + "/runs", params={"count": 1, "run_id": run_id}).status_code == 409
        with pytest.raises(RunExistsError):
            srv.call(sse.runs.open, run_id)


def test_unknown_and_malformed_runs_are_clear_errors() -> None:
    with served(producer_app()) as (srv, _):
        assert httpx.get(srv.url + "/runs/nope").status_code == 404
        assert httpx.get(srv.url + "/runs/.bad").status_code == 400
        assert httpx.post(srv.url + "/runs/nope/cancel").status_code == 404


def test_a_run_whose_producer_stops_renewing_ends_as_lost_for_its_viewers() -> None:
    # A producer whose process died holds its lease no more: a viewer's worker ends
    # the run for it. Here the lease is taken by an owner that never renews it.
    app = router_app(fast_settings(run_lease=0.3, run_poll_interval=0.05))
    with served(app) as (srv, sse):
        assert srv.call(lambda: sse.runs.ledger.begin("ghost", "gone-worker", first=0, lease=0.3, retain=60))
        with open_stream(srv.url + "/runs/ghost", opened=False) as viewer:
            events = viewer.rest()
        assert [(e.event, e.json()) for e in events] == [("end", {"status": "lost"})]


def test_runs_keep_more_events_than_channel_history() -> None:
    app = producer_app(fast_settings(history_size=5))
    with served(app) as (srv, _):
        run_id = finished(srv, app, 40)
        with open_stream(srv.url + f"/runs/{run_id}", opened=False) as viewer:
            events = viewer.rest()
        assert [e.json()["n"] for e in events[:-1]] == list(range(40))


def test_the_producer_side_in_process() -> None:
    async def scenario() -> None:
        async with SSEService(fast_settings(run_poll_interval=0.05)) as sse:
            async with await sse.runs.open("job-1") as run:
                await run.send("progress", {"percent": 50})
                assert await sse.runs.cancel("job-1")
                with pytest.raises(RunCancelled):
                    await run.send("progress", {"percent": 100})
            assert run.ended
            assert not await sse.runs.cancel("job-1")

    asyncio.run(scenario())


def test_the_router_can_leave_runs_out() -> None:
    app = FastAPI()
    app.include_router(create_sse_router(fast_settings(), authorize=allow_all, runs_path=None))
    assert not [r for r in app.routes if "runs" in getattr(r, "path", "")]


def generator_app() -> FastAPI:
    """Routes that return a stream built from an async generator: per request, and as
    a resumable run. ``app.state.gate`` releases the generator's events one by one."""
    app = router_app(fast_settings())
    app.state.log = []

    async def tokens(count: int, gate: asyncio.Queue[None]) -> AsyncIterator[Any]:
        try:
            for n in range(count):
                await gate.get()
                yield ("token", {"n": n})
            yield {"all": count}  # data alone: event "message"
        finally:
            app.state.log.append("closed")

    @app.post("/ask")
    async def ask(sse: SSEDep, count: int) -> Any:
        app.state.gate = asyncio.Queue()
        return await sse.runs.serve(tokens(count, app.state.gate))

    @app.get("/job/{job_id}")
    async def job(sse: SSEDep, job_id: str, count: int) -> Any:
        if not hasattr(app.state, "gate") or job_id not in app.state.log:
            app.state.gate = asyncio.Queue()
            app.state.log.append(job_id)
        return await sse.runs.serve(tokens(count, app.state.gate), run_id=job_id)

    return app


def release(srv: Any, app: FastAPI, times: int) -> None:
    for _ in range(times):
        srv.call(app.state.gate.put_nowait, None)


def test_a_generator_per_request_streams_then_ends_and_stops_when_the_client_leaves() -> None:
    app = generator_app()
    with served(app) as (srv, _):
        with httpx.Client(timeout=10) as http, http.stream("POST", srv.url + "/ask", params={"count": 2}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            release(srv, app, 2)
            body = "".join(r.iter_text())
        assert body.count("event: token") == 2 and 'event: message\ndata: {"all":2}' in body
        assert 'event: end\ndata: {"status":"done","result":null}' in body
        # A client that leaves mid-stream stops the generator.
        with (
            httpx.Client(timeout=10) as http,
            http.stream("POST", srv.url + "/ask", params={"count": 5}) as r,
        ):
            release(srv, app, 1)
            for line in r.iter_lines():
                if line.startswith("event: token"):
                    break
        wait_until(lambda: app.state.log.count("closed") == 2, message="the generator to be closed")


def test_a_generator_with_a_run_id_runs_once_and_a_reconnect_resumes_it() -> None:
    app = generator_app()
    with served(app) as (srv, _):
        url = srv.url + "/job/j1?count=3"
        with open_stream(url, opened=False) as first:
            release(srv, app, 1)
            got = first.next_event()
        assert got.json() == {"n": 0}
        # The client left; the run goes on. It comes back with its Last-Event-ID.
        release(srv, app, 2)
        with open_stream(url, opened=False, headers={"Last-Event-ID": got.id}) as again:
            rest = again.rest()
        assert [e.event for e in rest] == ["token", "token", "message", "end"]
        assert app.state.log.count("j1") == 1 and app.state.log.count("closed") == 1


def test_a_viewer_that_reads_slowly_catches_up_from_history_and_loses_nothing() -> None:
    # Its buffer holds two events; the run has 400 events of 30 KB (more than the
    # socket buffers take), all published while the viewer reads nothing. It is not
    # cut, nor does it lose one: it catches up from the run's history.
    app = router_app(fast_settings(max_buffer_bytes=64 * 1024))
    with served(app) as (srv, sse):
        run = srv.call(sse.runs.open, "slow")
        sock, head = raw_request(srv.port, "/runs/slow", rcvbuf=4096)
        assert head is not None and head.status == 200

        async def fill() -> None:
            async with run:
                for n in range(400):
                    await run.send("chunk", Text(f"{n:05d}" + "x" * 30_000))

        srv.call(fill, timeout=60)
        body = head.read_to_end()
        sock.close()
        events = [e for e in parse(body) if e.event in ("chunk", "end")]
        assert [int(e.data[:5]) for e in events[:-1]] == list(range(400))
        assert events[-1].event == "end"
        assert "slow_consumer" not in sse.stats().disconnects
        assert sse.stats().events_dropped == 0


def test_a_thousand_viewers_of_one_run_each_get_every_event_exactly_once() -> None:
    from bench.apps.runs import app as bench_app
    from bench.loadgen import raise_fd_limit
    from bench.runs import fan_out

    raise_fd_limit(4096)
    with served(bench_app) as (srv, sse):
        # fan_out checks that 1,000 viewers got 50 tokens each, then the end.
        assert asyncio.run(fan_out(srv.port, 1000, 50, "run")) > 0
        assert sse.stats().disconnects.get("run_ended") == 1000


def test_an_ended_run_is_forgotten_after_its_retention_and_its_id_is_free_again() -> None:
    app = producer_app(fast_settings(run_retention=0.3))
    with served(app) as (srv, _):
        run_id = finished(srv, app, 1)
        with open_stream(srv.url + f"/runs/{run_id}", opened=False) as viewer:
            assert [e.event for e in viewer.rest()] == ["token", "end"]
        wait_until(lambda: httpx.get(srv.url + f"/runs/{run_id}").status_code == 404, message="the run to expire")
        assert start(srv, 1, run_id) == run_id
