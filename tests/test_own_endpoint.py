"""A route of the app's own that calls ``add_client``: resumes, frees what it refuses,
obeys every limit, and shares one service and its hooks with the router."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
import redis
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Security
from fastapi.security import SecurityScopes
from helpers.apps import fast_settings, router_app, served
from helpers.paths import ROOT
from helpers.redis import RedisServer
from helpers.streams import open_stream, raw_request, soft_refusal, wait_until

from fastapi_sse import (
    SSEClient,
    SSEDep,
    SSEResponse,
    SSEService,
    SSESettings,
    allow_all,
    create_sse_router,
    get_sse_from_app,
    sse_lifespan,
)


def own_app(settings: SSESettings | None = None, *, check: bool = False) -> FastAPI:
    """The pattern users write: ``add_client()`` with no arguments, then ``subscribe``.
    With ``check``, the handler refuses ``user=mallory`` after opening the client, as an
    app's own 403 check does."""
    app = FastAPI(lifespan=sse_lifespan(settings or fast_settings()))

    @app.get("/events", response_class=SSEResponse)
    async def events(sse: SSEDep, user: str) -> SSEResponse:
        client, response = sse.add_client(identity=user)
        sse.subscribe(client.id, f"user:{user}")
        if check and user == "mallory":
            raise HTTPException(403, "not yours")
        return response

    return app


@pytest.mark.parametrize("event_id", ["note-7", "évt-1", "事件-2"])
def test_add_client_resumes_from_the_request_header(event_id: str) -> None:
    app = own_app()
    with served(app) as (server, sse):
        server.call(sse.broadcast, "user:ann", "note", {"n": 1}, event_id)
        server.call(sse.broadcast, "user:ann", "note", {"n": 2})
        # A browser sends the header as UTF-8 bytes.
        sock, response = raw_request(server.port, "/events?user=ann", {"Last-Event-ID": event_id.encode()})
        with sock:
            assert response is not None and response.status == 200
            body = response.read_until(b'{"n":2}').decode()
        assert '{"n":1}' not in body
        assert "event: gap" not in body


def test_add_client_resumes_from_the_query_on_a_first_connection() -> None:
    app = own_app()
    with served(app) as (server, sse):
        server.call(sse.broadcast, "user:ann", "note", {"n": 1}, "first")
        server.call(sse.broadcast, "user:ann", "note", {"n": 2})
        with open_stream(f"{server.url}/events", params={"user": "ann", "last_event_id": "first"}) as stream:
            # The opening already held the replay: the frame after the retry hint was {"n":2}.
            assert [f.data for f in stream.frames if f.data] == ['{"n":2}']
            assert sse.stats().resumes == 1


def test_a_handler_that_refuses_after_add_client_frees_its_slot_at_once(http: httpx.Client) -> None:
    # attach_timeout is an hour: only the request's end can free the slots.
    app = own_app(fast_settings(max_connections=2, attach_timeout=3600.0), check=True)
    with served(app) as (server, sse):
        for _ in range(50):
            assert http.get(f"{server.url}/events", params={"user": "mallory"}).status_code == 403
        wait_until(lambda: server.call(lambda: sse.stats().total_connections) == 0, message="slots released")
        with (
            open_stream(f"{server.url}/events", params={"user": "ann"}),
            open_stream(f"{server.url}/events", params={"user": "bob"}),
        ):
            assert server.call(lambda: sse.stats().total_connections) == 2
        stats = server.call(sse.stats)
        assert stats.disconnects.get("never_started") == 50
        assert stats.refused == {}


def redis_settings(server: RedisServer, **values: Any) -> SSESettings:
    return fast_settings(
        backend="redis",
        redis_url=server.url,
        redis_key_prefix=f"test:{uuid.uuid4().hex[:10]}:",
        presence_interval=0.2,
        redis_timeout=1.0,
        **values,
    )


def test_the_identity_limit_holds_in_an_own_route_on_redis(redis_server: RedisServer, http: httpx.Client) -> None:
    settings = redis_settings(redis_server, max_connections_per_identity=1, identity_limit_policy="refuse")
    with served(own_app(settings)) as (server, sse), open_stream(f"{server.url}/events", params={"user": "ann"}):
        refused = http.get(f"{server.url}/events", params={"user": "ann"})
        assert "max_connections_per_identity" in soft_refusal(refused)
        assert server.call(lambda: sse.stats().refused) == {"max_connections_per_identity": 1}
        # Another identity is not affected.
        with open_stream(f"{server.url}/events", params={"user": "bob"}):
            pass


def test_remove_oldest_across_two_workers_in_an_own_route(redis_server: RedisServer) -> None:
    settings = redis_settings(redis_server, max_connections_per_identity=1)
    with ExitStack() as stack:
        one, _ = stack.enter_context(served(own_app(settings)))
        two, _ = stack.enter_context(served(own_app(settings)))
        first = stack.enter_context(open_stream(f"{one.url}/events", params={"user": "ann"}))
        stack.enter_context(open_stream(f"{two.url}/events", params={"user": "ann"}))
        # The older stream, on the other worker, is closed to make room.
        assert first.rest() == []


def test_identity_slots_come_back_after_redis_loses_its_data(redis_server: RedisServer, http: httpx.Client) -> None:
    settings = redis_settings(redis_server, max_connections_per_identity=1, identity_limit_policy="refuse")
    group = f"{settings.redis_key_prefix}g:identity:ann"
    store = redis.Redis.from_url(redis_server.url)
    with served(own_app(settings)) as (server, _), open_stream(f"{server.url}/events", params={"user": "ann"}):
        assert store.zcard(group) == 1
        store.flushall()
        # The worker's next registration finds itself gone and restores the slot.
        wait_until(lambda: store.zcard(group) == 1, message="the identity slot restored")
        assert "max_connections_per_identity" in soft_refusal(http.get(f"{server.url}/events", params={"user": "ann"}))
    store.close()


def test_both_setups_share_one_service() -> None:
    settings = fast_settings()
    app = FastAPI(lifespan=sse_lifespan(settings))
    app.include_router(create_sse_router(settings, authorize=allow_all))

    @app.post("/say")
    async def say(sse: SSEDep) -> None:
        sse.broadcast("news", "said", {"n": 1})

    with served(app) as (server, sse), open_stream(f"{server.url}/subscribe", params={"channel": "news"}) as stream:
        assert httpx.post(f"{server.url}/say").status_code == 200
        assert stream.next_event().data == '{"n":1}'
        assert get_sse_from_app(app) is sse


def test_a_second_service_with_other_settings_is_refused_at_startup() -> None:
    app = FastAPI(lifespan=sse_lifespan(fast_settings()))
    app.include_router(create_sse_router(fast_settings(max_connections=5), authorize=allow_all))

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pass  # pragma: no cover - refused before

    with pytest.raises(RuntimeError, match=r"already runs an SSE service.*Keep one setup"):
        asyncio.run(start())


class Pool:
    """A pool of ``size`` connections, like a database's: a dependency holds one."""

    def __init__(self, size: int) -> None:
        self.free = asyncio.Semaphore(size)
        self.held = 0

    async def session(self) -> AsyncIterator[str]:
        try:
            # Generous: a stream's dependencies close just after its opening is written.
            async with asyncio.timeout(10.0):
                await self.free.acquire()
        except TimeoutError:
            raise HTTPException(503, "pool exhausted") from None
        self.held += 1
        try:
            yield "session"
        finally:
            self.held -= 1
            self.free.release()


def test_route_dependencies_are_released_once_the_stream_opens() -> None:
    """More streams than a pool of two allows, through both doors: all stream."""
    pool = Pool(2)

    async def pooled_user(user: str, db: str = Depends(pool.session)) -> str:
        return user

    app = FastAPI()
    app.include_router(
        create_sse_router(
            fast_settings(),
            authorize=allow_all,
            default_channels=lambda user=Depends(pooled_user): [f"user:{user}"],
            identify=pooled_user,
        )
    )

    @app.get("/own", response_class=SSEResponse)
    async def own(sse: SSEDep, user: str = Depends(pooled_user)) -> SSEResponse:
        client, response = sse.add_client()
        sse.subscribe(client.id, f"user:{user}")
        return response

    with served(app) as (server, sse), ExitStack() as stack:
        streams = [
            stack.enter_context(open_stream(f"{server.url}{path}", params={"user": f"u{i}"}))
            for i in range(5)
            for path in ("/subscribe", "/own")
        ]
        wait_until(lambda: pool.held == 0, message="every stream's session closed")
        for i in range(5):
            server.call(sse.broadcast, f"user:u{i}", "note", {"to": i})
        assert [json.loads(s.next_event().data)["to"] for s in streams] == [i for i in range(5) for _ in range(2)]


class User:
    def __init__(self, name: str, scopes: list[str]) -> None:
        self.name = name
        self.scopes = scopes


async def bearer(authorization: Annotated[str | None, Header()] = None) -> str:
    if not authorization or not authorization.startswith("Bearer "):
        raise HTTPException(401, "no token")
    return authorization.removeprefix("Bearer ")


async def current_user(security: SecurityScopes, token: Annotated[str, Depends(bearer)]) -> User:
    name, _, granted = token.partition(":")
    scopes = granted.split(",") if granted else []
    if not set(security.scopes) <= set(scopes):
        raise HTTPException(403, f"missing scope {security.scope_str!r}")
    return User(name, scopes)


async def current_user_id(user: Annotated[User, Security(current_user, scopes=["events"])]) -> str:
    return user.name


def can_read(channel: str, user: Annotated[User, Security(current_user, scopes=["events"])]) -> bool:
    return channel == f"team:{user.name}" or "admin" in user.scopes


def initial_state(client: SSEClient, sse: SSEService, user: Annotated[User, Depends(current_user)]) -> None:
    sse.send_to(client.id, "hello", {"user": user.name})


def hooked_app() -> FastAPI:
    app = FastAPI()
    app.include_router(
        create_sse_router(
            fast_settings(max_connections_per_identity=1, identity_limit_policy="refuse"),
            authorize=can_read,
            identify=current_user_id,
            on_connect=initial_state,
        )
    )
    return app


def test_hooks_are_dependencies_with_security_scopes(http: httpx.Client) -> None:
    with served(hooked_app()) as (server, _):
        url = f"{server.url}/subscribe"
        assert http.get(url).status_code == 401
        missing = http.get(url, headers={"Authorization": "Bearer ann:other"})
        assert missing.status_code == 403 and "events" in missing.json()["detail"]
        refused = http.get(url, params={"channel": "team:bob"}, headers={"Authorization": "Bearer ann:events"})
        assert refused.status_code == 403 and "team:bob" in refused.json()["detail"]
        with open_stream(url, params={"channel": "team:ann"}, headers={"Authorization": "Bearer ann:events"}) as s:
            assert json.loads(s.next_event().data) == {"user": "ann"}
            # identify came from the same dependencies: ann is at her limit of one.
            again = http.get(url, params={"channel": "team:ann"}, headers={"Authorization": "Bearer ann:events"})
            assert "max_connections_per_identity" in soft_refusal(again)


def test_dependency_overrides_reach_the_hooks(http: httpx.Client) -> None:
    app = hooked_app()
    app.dependency_overrides[bearer] = lambda: "tester:events,admin"
    with served(app) as (server, _), open_stream(f"{server.url}/subscribe", params={"channel": "team:x"}) as s:
        assert json.loads(s.next_event().data) == {"user": "tester"}
    app.dependency_overrides = {current_user_id: lambda: "robot", bearer: lambda: "robot:events"}
    with served(app) as (server, sse), open_stream(f"{server.url}/subscribe"):
        assert [c.identity for c in server.call(sse.get_clients)] == ["robot"]


def test_plain_hooks_keep_working() -> None:
    app = FastAPI()
    app.include_router(
        create_sse_router(
            fast_settings(),
            authorize=lambda request, channel: channel != "secret",
            identify=lambda request: request.query_params.get("user"),
            default_channels=lambda request: ["lobby"],
            on_connect=lambda request, client, sse: sse.send_to(client.id, "hello", {"path": request.url.path}),
        )
    )
    with served(app) as (server, sse):
        assert httpx.get(f"{server.url}/subscribe", params={"channel": "secret"}).status_code == 403
        with open_stream(f"{server.url}/subscribe", params={"user": "ann", "channel": "x"}) as stream:
            assert json.loads(stream.next_event().data) == {"path": "/subscribe"}
            [client] = server.call(sse.get_clients)
            assert (client.identity, client.channels) == ("ann", {"lobby", "x"})


def load_app(path: Path) -> FastAPI:
    spec = importlib.util.spec_from_file_location(f"openapi_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the module's annotations through it
    spec.loader.exec_module(module)
    app: FastAPI = module.app
    return app


APPS = [ROOT / "example_app" / "main.py", *sorted((ROOT / "docs" / "examples").glob("*.py"))]


@pytest.mark.parametrize("path", [p for p in APPS if "app = " in p.read_text()], ids=lambda p: p.stem)
def test_every_stream_route_shows_in_openapi_as_an_event_stream(path: Path) -> None:
    schema = load_app(path).openapi()
    streams = [
        (route, op)
        for route, ops in schema["paths"].items()
        for method, op in ops.items()
        if method == "get" and "text/event-stream" in op["responses"].get("200", {}).get("content", {})
    ]
    assert streams, f"no text/event-stream route in {path.name}"
    for _, op in streams:
        stream = op["responses"]["200"]["content"]["text/event-stream"]
        # A route documenting typed events carries their models, which FastAPI titles.
        assert {k: v for k, v in stream["schema"].items() if k != "title"} == {"type": "string"}
        assert "title" not in stream["schema"] or "itemSchema" in stream


def test_the_router_documents_the_last_event_id_header() -> None:
    app = FastAPI()
    app.include_router(create_sse_router(fast_settings(), authorize=allow_all))
    op = app.openapi()["paths"]["/subscribe"]["get"]
    assert op["operationId"] == "sse_subscribe"
    assert {"name": "Last-Event-ID", "in": "header"}.items() <= next(
        p for p in op["parameters"] if p["name"] == "Last-Event-ID"
    ).items()


def header_names(response_head: list[str]) -> list[str]:
    return [line.partition(":")[0].strip().lower() for line in response_head]


def test_no_connection_header_from_the_stream() -> None:
    app = own_app()
    with served(app) as (server, _):
        for version in ("HTTP/1.1", "HTTP/1.0"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(f"GET /events?user=ann {version}\r\nHost: x\r\n\r\n".encode())
                head = b""
                while b"\r\n\r\n" not in head:
                    head += sock.recv(4096)
                lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
                assert header_names(lines).count("connection") <= 1, lines
                if version == "HTTP/1.1":
                    assert "connection" not in header_names(lines), lines


def test_no_hop_by_hop_headers_on_http2() -> None:
    """HTTP/2 forbids Connection (RFC 9113 8.2.2); no HTTP/2 server that would pass it on
    runs here, so the ASGI messages are checked directly."""
    app = own_app()
    sent: list[dict[str, Any]] = []

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            received = asyncio.Event()

            async def receive() -> dict[str, Any]:
                if not received.is_set():
                    received.set()
                    return {"type": "http.request", "body": b"", "more_body": False}
                return {"type": "http.disconnect"}

            async def send(message: Any) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "2",
                "method": "GET",
                "scheme": "https",
                "path": "/events",
                "raw_path": b"/events",
                "query_string": b"user=ann",
                "headers": [(b"host", b"x")],
                "server": ("127.0.0.1", 443),
                "client": ("127.0.0.1", 1),
                "root_path": "",
                "app": app,
            }
            await app(scope, receive, send)

    asyncio.run(scenario())
    start = sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert [name for name, _ in start["headers"] if name.lower() in (b"connection", b"keep-alive")] == []


def test_a_request_without_a_stream_is_untouched(http: httpx.Client) -> None:
    app = own_app()

    @app.get("/plain")
    async def plain(request: Request) -> dict[str, str]:
        return {"ok": "yes"}

    with served(app) as (server, _):
        assert http.get(f"{server.url}/plain").json() == {"ok": "yes"}


def test_a_resume_storm_reads_history_a_few_times_not_once_per_stream(redis_server: RedisServer) -> None:
    settings = redis_settings(redis_server, max_connections=1000)
    store = redis.Redis.from_url(redis_server.url)

    def script_calls() -> int:
        return int(store.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    with served(router_app(settings)) as (server, sse):
        ids = [server.call(sse.publish, "user:storm", "note", {"n": n}) for n in range(10)]
        before = script_calls()

        async def storm(count: int) -> list[bytes]:
            async def resume() -> bytes:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(
                    f"GET /subscribe?channel=user:storm HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {ids[4]}\r\n\r\n".encode()
                )
                body = b""
                while b'{"n":9}' not in body:
                    chunk = await reader.read(65536)
                    assert chunk, body
                    body += chunk
                writer.close()
                await writer.wait_closed()
                return body

            return await asyncio.wait_for(asyncio.gather(*(resume() for _ in range(count))), 30)

        bodies = asyncio.run(storm(200))
        reads = script_calls() - before
    store.close()
    for body in bodies:
        assert [n for n in range(10) if f'{{"n":{n}}}'.encode() in body] == [5, 6, 7, 8, 9]
    # 200 streams resumed on the same channel: history was read a few times, not 200.
    assert 1 <= reads <= 20, reads


def test_streams_resuming_together_from_different_cursors_each_get_their_own_answer(
    redis_server: RedisServer,
) -> None:
    settings = redis_settings(redis_server, history_size=3)
    with served(router_app(settings)) as (server, sse):
        ids = [server.call(sse.publish, "c", "note", {"n": n}) for n in range(10)]

        async def resume(cursor: str) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET /subscribe?channel=c HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {cursor}\r\n\r\n".encode())
            body = b""
            while b'{"n":9}' not in body and b"event: gap" not in body:
                chunk = await reader.read(65536)
                assert chunk, body
                body += chunk
            writer.close()
            await writer.wait_closed()
            return body

        async def together() -> list[bytes]:
            return await asyncio.gather(*(resume(ids[i]) for i in (1, 7, 8, 1, 7)))

        old, seven, eight, old_again, seven_again = asyncio.run(together())
    # History keeps the last three (7, 8, 9): a cursor at 1 is a gap, at 7 or 8 exact.
    assert b"event: gap" in old and b"event: gap" in old_again
    for body, expected in ((seven, [8, 9]), (seven_again, [8, 9]), (eight, [9])):
        assert b"event: gap" not in body
        assert [n for n in range(10) if f'{{"n":{n}}}'.encode() in body] == expected
