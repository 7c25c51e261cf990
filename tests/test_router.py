"""The router factory: subscribe endpoint, hooks, the opt-in admin route, OpenAPI and names."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from helpers.apps import fast_settings, router_app, served
from helpers.streams import open_stream, wait_until

from fastapi_sse import SSEClient, SSEService, allow_all, create_sse_router


def sync_authorize(request: Request, channel: str) -> bool:
    return not channel.startswith("secret")


async def async_authorize(request: Request, channel: str) -> bool:
    return not channel.startswith("secret")


@pytest.mark.parametrize("authorize", [sync_authorize, async_authorize])
def test_authorize_refuses_a_channel_with_403_and_no_client(http: httpx.Client, authorize: Any) -> None:
    with served(router_app(authorize=authorize)) as (srv, sse):
        response = http.get(srv.url + "/subscribe", params={"channel": ["public", "secret-plans"]})
        assert response.status_code == 403
        assert "secret-plans" in response.json()["detail"]
        assert srv.call(sse.get_clients) == []
        assert sse.stats().connects == 0
        with open_stream(srv.url + "/subscribe", params={"channel": ["public", "other"]}) as stream:
            client = wait_until(lambda: srv.call(sse.get_clients))[0]
            assert client.channels == {"public", "other"}
            srv.call(sse.broadcast, "other", "e", 1)
            assert stream.next_event().json() == 1


def test_default_channels_identify_and_on_connect_sync() -> None:
    seen: list[tuple[str, str | None]] = []

    def on_connect(request: Request, client: SSEClient, sse: SSEService) -> None:
        seen.append((client.id, client.identity))
        sse.send_to(client.id, "initialState", {"unread": 3})

    app = router_app(
        authorize=lambda request, channel: False,  # only the defaults are allowed
        default_channels=lambda request: [f"user:{request.headers['x-user']}"],
        identify=lambda request: request.headers["x-user"],
        on_connect=on_connect,
    )
    with served(app) as (srv, sse):
        srv.call(sse.broadcast, "user:5", "before", 0)
        with open_stream(srv.url + "/subscribe", headers={"x-user": "5"}) as stream:
            first = stream.next_event()
            srv.call(sse.broadcast, "user:5", "notification", {"n": 1})
            second = stream.next_event()
        assert (first.event, first.json()) == ("initialState", {"unread": 3})
        assert (second.event, second.json()) == ("notification", {"n": 1})
        assert seen[0][1] == "5"
        assert sse.stats().connects == 1


def test_async_hooks_and_defaults_are_not_authorized() -> None:
    async def default_channels(request: Request) -> list[str]:
        return ["secret-user-9"]

    async def identify(request: Request) -> str | None:
        return None

    async def on_connect(request: Request, client: SSEClient, sse: SSEService) -> None:
        await sse.publish_to(client.id, "initialState", {"channels": sorted(client.channels)})

    app = router_app(
        authorize=async_authorize,
        default_channels=default_channels,
        identify=identify,
        on_connect=on_connect,
    )
    with (
        served(app) as (srv, sse),
        open_stream(srv.url + "/subscribe", params={"channel": ["news", "secret-user-9"]}) as stream,
    ):
        got = stream.next_event()
        assert got.json() == {"channels": ["news", "secret-user-9"]}
        client = srv.call(sse.get_clients)[0]
        assert client.identity is None


def test_admin_route_absent_without_protection(http: httpx.Client) -> None:
    app = router_app()
    with served(app) as (srv, _):
        assert http.get(srv.url + "/admin/connections").status_code == 404
    assert "/admin/connections" not in app.openapi()["paths"]
    with pytest.raises(Exception, match="fastapi_sse:connections"):
        app.url_path_for("fastapi_sse:connections")


def require_token(x_admin_token: str | None = Header(None)) -> None:
    if x_admin_token != "s3cret":
        raise HTTPException(401, "admin token required")


def test_admin_route_refused_without_its_protection_and_reports_stats(http: httpx.Client) -> None:
    app = router_app(admin_dependencies=[Depends(require_token)])
    with served(app) as (srv, sse):
        assert http.get(srv.url + "/admin/connections").status_code == 401
        assert http.get(srv.url + "/admin/connections", headers={"x-admin-token": "wrong"}).status_code == 401
        with open_stream(srv.url + "/subscribe", params={"channel": ["a", "b"]}):
            response = http.get(srv.url + "/admin/connections", headers={"x-admin-token": "s3cret"})
        assert response.status_code == 200
        body = response.json()
        assert body["scope"] == "worker"
        assert body["worker_id"] == sse.worker_id
        assert body["total_connections"] == 1
        assert body["by_channel"] == {"a": 1, "b": 1}
        assert body["oldest_connection"] is not None


def test_openapi_documents_the_stream_and_the_stats_model() -> None:
    app = router_app(admin_dependencies=[Depends(require_token)])
    schema = app.openapi()
    subscribe = schema["paths"]["/subscribe"]["get"]
    assert "text/event-stream" in subscribe["responses"]["200"]["content"]
    assert {"403", "429", "503", "400"} <= set(subscribe["responses"])
    params = {p["name"]: p for p in subscribe["parameters"]}
    assert params["channel"]["schema"]["type"] == "array"
    assert "last_event_id" in params
    admin = schema["paths"]["/admin/connections"]["get"]
    ref = admin["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ConnectionStats")
    fields = schema["components"]["schemas"]["ConnectionStats"]["properties"]
    assert {"total_connections", "by_channel", "oldest_connection"} <= set(fields)


def test_route_names_paths_and_prefix_chosen_by_the_app() -> None:
    app = FastAPI()
    router = create_sse_router(
        fast_settings(),
        authorize=allow_all,
        subscribe_path="/stream",
        admin_dependencies=[Depends(require_token)],
        admin_path="/stats",
    )
    assert router.prefix == "" and router.tags == []
    app.include_router(router, prefix="/sse", tags=["events"])
    assert app.url_path_for("fastapi_sse:subscribe") == "/sse/stream"
    assert app.url_path_for("fastapi_sse:connections") == "/sse/stats"
    with served(app) as (srv, sse), open_stream(srv.url + "/sse/stream", params={"channel": "p"}) as stream:
        srv.call(sse.broadcast, "p", "e", "prefixed")
        assert stream.next_event().json() == "prefixed"


def test_duplicate_channels_are_subscribed_once(http: httpx.Client) -> None:
    with (
        served(router_app(fast_settings(max_channels_per_connection=2))) as (srv, sse),
        open_stream(srv.url + "/subscribe", params={"channel": ["d", "d", "e", "d"]}),
    ):
        client = wait_until(lambda: srv.call(sse.get_clients))[0]
        assert client.channels == {"d", "e"}


def test_router_requires_authorize() -> None:
    with pytest.raises(TypeError, match="authorize"):
        create_sse_router(fast_settings())  # type: ignore[call-arg]


def test_a_failing_hook_after_add_client_leaves_no_client(http: httpx.Client) -> None:
    # Regression: a refusal raised by on_connect, or a malformed default channel, left
    # the half-made client registered until attach_timeout.
    def on_connect(request: Request, client: SSEClient, sse: SSEService) -> None:
        if request.headers.get("x-refuse"):
            raise HTTPException(409, "refused by on_connect")

    app = router_app(
        fast_settings(max_connections_per_identity=1, identity_limit_policy="refuse"),
        default_channels=lambda request: [request.headers.get("x-default", "ok")],
        identify=lambda request: "someone",
        on_connect=on_connect,
    )
    with served(app) as (srv, sse):
        response = http.get(srv.url + "/subscribe", headers={"x-refuse": "1"})
        assert response.status_code == 409
        assert srv.call(sse.get_clients) == []
        response = http.get(srv.url + "/subscribe", headers={"x-default": "not a channel"})
        assert response.status_code == 400
        assert "pattern" in response.json()["detail"]
        assert srv.call(sse.get_clients) == []
        # The identity's one slot is free again.
        with open_stream(srv.url + "/subscribe") as stream:
            srv.call(sse.broadcast, "ok", "e", "connected")
            assert stream.next_event().json() == "connected"
