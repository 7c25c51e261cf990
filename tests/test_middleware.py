"""``SSEMiddleware``: an open stream runs on outside the route that opened it."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from helpers.apps import fast_settings, served
from helpers.streams import open_stream, raw_request, wait_until
from starlette.types import Message, Receive, Scope, Send

from fastapi_sse import SSEDep, SSEMiddleware, sse_lifespan
from fastapi_sse.middleware import Slot

ORIGIN = "https://app.example"


def stream_app(
    *, middleware: bool, outside_route: bool = True
) -> tuple[FastAPI, list[str], list[weakref.ref[Request]]]:
    """An endpoint of the app's own (``add_client``) with a ``yield`` dependency and a
    background task, behind CORS and a ``BaseHTTPMiddleware``; ``log`` records what ran
    and when. ``middleware`` adds SSEMiddleware by hand; without it the lifespan adds it."""
    app = FastAPI(lifespan=sse_lifespan(fast_settings(stream_outside_route=outside_route)))
    log: list[str] = []
    requests: list[weakref.ref[Request]] = []

    @app.middleware("http")
    async def tag(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["x-tagged"] = "1"
        return response

    app.add_middleware(CORSMiddleware, allow_origins=[ORIGIN])
    if middleware:
        app.add_middleware(SSEMiddleware)

    async def session() -> AsyncIterator[str]:
        log.append("session opened")
        yield "session"
        log.append("session closed")

    @app.get("/events")
    async def events(request: Request, sse: SSEDep, tasks: BackgroundTasks, _: str = Depends(session)) -> Any:
        client, response = sse.add_client()
        sse.subscribe(client.id, "feed")
        requests.append(weakref.ref(request))
        tasks.add_task(log.append, "background ran")
        return response

    @app.get("/probe")
    async def probe() -> dict[str, Any]:
        gc.collect()
        return {"log": list(log), "requests alive": sum(ref() is not None for ref in requests)}

    return app, log, requests


@pytest.mark.parametrize(
    ("middleware", "outside_route"),
    [(True, True), (False, True), (False, False)],
    ids=["added-by-hand", "by-default", "inside-route"],
)
def test_an_open_stream_leaves_the_route(middleware: bool, outside_route: bool, http: Any) -> None:
    app, log, _ = stream_app(middleware=middleware, outside_route=outside_route)
    with served(app) as (server, sse):
        with open_stream(f"{server.url}/events", headers={"Origin": ORIGIN}) as stream:
            # The headers went through every middleware.
            assert stream.response.headers["access-control-allow-origin"] == ORIGIN
            assert stream.response.headers["x-tagged"] == "1"
            server.call(sse.broadcast, "feed", "tick", {"n": 1})
            assert stream.next_event().data == '{"n":1}'
            probe = http.get(f"{server.url}/probe").json()
            if outside_route:
                # The route has returned: its dependency closed and its request is gone.
                assert probe == {"log": ["session opened", "session closed"], "requests alive": 0}
            else:
                assert probe == {"log": ["session opened"], "requests alive": 1}
            server.call(sse.broadcast, "feed", "tick", {"n": 2})
            assert stream.next_event().data == '{"n":2}'
        wait_until(lambda: not sse.get_clients(), message="the disconnect noticed")
        wait_until(lambda: "background ran" in log, message="the background task ran")
        assert log.count("session closed") == 1


def test_the_stream_ends_through_the_middleware(http: Any) -> None:
    app, log, _ = stream_app(middleware=True)
    with served(app) as (server, sse):
        with open_stream(f"{server.url}/events") as stream:
            wait_until(lambda: sse.get_clients(), message="the stream open")
            server.call(sse.broadcast, "feed", "tick", {"n": 1})
            [client] = sse.get_clients()
            server.call(sse.remove_client, client.id)
            assert [event.data for event in stream.rest()] == ['{"n":1}']
        wait_until(lambda: "background ran" in log, message="the background task ran")


def late_writer(app: Any) -> Any:
    """A misbehaving layer: writes again after the app it wraps has returned."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        await app(scope, receive, send)
        if scope["type"] == "http" and scope["path"] == "/events":
            await send({"type": "http.response.body", "body": b"late", "more_body": True})

    return wrapped


def test_a_layer_writing_after_the_stream_left_is_an_error() -> None:
    app, _, _ = stream_app(middleware=False)
    app.add_middleware(late_writer)
    app.add_middleware(SSEMiddleware)
    with served(app) as (server, sse):
        sock, response = raw_request(server.port, "/events")
        assert response is not None and response.status == 200
        # The stream is not left half-run: the connection ends, the late write never
        # reaches the client, and the service lets go of the client.
        rest = b""
        with sock:
            while chunk := sock.recv(65536):
                rest += chunk
        assert b"late" not in rest
        wait_until(lambda: not sse.get_clients(), message="the client let go")


def test_the_relay_names_the_misplaced_layer() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def scenario() -> None:
        slot = Slot({"type": "http"}, send, hand_off=True)
        await slot.relay({"type": "http.response.body", "body": b"a", "more_body": True})
        slot.stream = object()  # type: ignore[assignment]
        # The end of the body from a layer inside is the stream's to write: dropped here.
        await slot.relay({"type": "http.response.body", "body": b"", "more_body": False})
        with pytest.raises(RuntimeError, match="add SSEMiddleware last"):
            await slot.relay({"type": "http.response.body", "body": b"late", "more_body": True})

    asyncio.run(scenario())
    assert sent == [{"type": "http.response.body", "body": b"a", "more_body": True}]


def test_requests_that_are_not_streams_pass_through(http: Any) -> None:
    app, _, _ = stream_app(middleware=True)
    with served(app) as (server, _):
        response = http.get(f"{server.url}/probe", headers={"Origin": ORIGIN})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert response.json()["log"] == []


def test_the_scope_keeps_what_outer_layers_read() -> None:
    """Once the stream has left its route, its scope holds neither FastAPI's exit stacks
    nor its routing state, in a table no bigger than its keys need, and still holds
    what a layer outside reads once the request ends: the route a metrics middleware
    labels requests with, the endpoint, the path parameters."""
    app, _, _ = stream_app(middleware=True)
    seen: list[tuple[str, list[str], int, int]] = []

    def metrics(inner: Any) -> Any:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            await inner(scope, receive, send)
            if scope["type"] == "http" and scope["path"] == "/events":
                rebuilt: dict[str, Any] = {}
                for key, value in scope.items():
                    rebuilt[key] = value
                seen.append((scope["route"].path, sorted(scope), sys.getsizeof(scope), sys.getsizeof(rebuilt)))

        return wrapped

    app.add_middleware(metrics)
    with served(app) as (server, sse):
        with open_stream(f"{server.url}/events") as stream:
            server.call(sse.broadcast, "feed", "tick", {"n": 1})
            assert stream.next_event().data == '{"n":1}'
            [client] = sse.get_clients()
            server.call(sse.remove_client, client.id)
            assert list(stream.rest()) == []
        wait_until(lambda: seen, message="the outer layer saw the request end")
    [(route, keys, size, smallest)] = seen
    assert route == "/events"
    assert {"app", "endpoint", "path_params", "route", "router", "headers", "query_string"} <= set(keys)
    assert not [key for key in keys if "astack" in key or key == "fastapi"]
    assert size == smallest
