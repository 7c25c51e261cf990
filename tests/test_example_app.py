"""The example app through a real uvicorn server, with httpx and httpx-sse."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers.apps import fast_settings
from helpers.documents import check_asyncapi, check_refs_resolve
from helpers.redis import RedisServer
from helpers.servers import Served, serve, serve_process
from helpers.streams import Stream, open_stream

from example_app.main import answer_tokens, canned_answer, create_app

TOKEN = "test-admin-token"
PAGE_CHANNELS = ["dashboard:stats", "dashboard:orders", "dashboard:alerts", "document:welcome"]
PAGE_IDS = [
    "signin-form",
    "user-id",
    "signed-in-as",
    "connection-status",
    "notifications",
    "unread-count",
    "dashboard-stats",
    "orders",
    "document-events",
    "task-progress",
    "task-status",
    "announcements",
    "reload-notice",
    "reload-count",
    "send-notification",
    "mark-read",
    "new-order",
    "edit-document",
    "start-task",
    "assistant-form",
    "prompt",
    "ask",
    "stop",
    "assistant-answer",
    "assistant-status",
]


@pytest.fixture
def served() -> Iterator[Served]:
    app = create_app(fast_settings(), admin_token=TOKEN, stats_interval=3600, task_step=0, token_interval=0)
    with serve(app) as served:
        yield served


def user(served: Served, name: str) -> httpx.Client:
    return httpx.Client(base_url=served.url, cookies={"user_id": name}, timeout=10)


def data(event: Any) -> Any:
    return json.loads(event.data)


def stream(
    served: Served,
    name: str,
    channels: list[str] | None = None,
    headers: dict[str, str] | None = None,
    *,
    opened: bool = True,
) -> Any:
    """The page's EventSource for user ``name`` (the page's channels by default)."""
    params = [("channel", c) for c in (PAGE_CHANNELS if channels is None else channels)]
    headers = {"Cookie": f"user_id={name}", **(headers or {})}
    return open_stream(f"{served.url}/sse/subscribe", params=params, headers=headers, opened=opened)


def initial(s: Stream) -> dict[str, Any]:
    event = s.next_event()
    assert event.event == "initialState"
    state: dict[str, Any] = data(event)
    return state


def test_login_sets_the_cookie_and_logout_clears_it(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=10) as http:
        assert http.get("/api/state").status_code == 401
        response = http.post("/login", data={"user_id": "alice"})
        assert response.status_code == 303
        assert response.headers["location"] == "/"
        assert http.get("/api/state").json()["user"] == "alice"
        assert http.post("/logout").status_code == 303
        assert http.get("/api/state").status_code == 401
        assert http.post("/login", data={"user_id": "al ice<script>"}).status_code == 400


def test_the_page_has_every_element_id_of_the_contract(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=10) as http:
        page = http.get("/")
        assert page.status_code == 200
        ids = set(re.findall(r'id="([^"]+)"', page.text))
        assert set(PAGE_IDS) <= ids
        script = http.get("/static/app.js")
        assert script.status_code == 200
        assert "window.sseLog" in script.text
        assert "/sse/subscribe" in script.text


def test_subscribing_needs_a_signed_in_user_and_own_user_channel(served: Served) -> None:
    url = f"{served.url}/sse/subscribe"
    with httpx.Client(timeout=10) as http:
        assert http.get(url, params={"channel": "dashboard:stats"}).status_code == 401
        bob = {"Cookie": "user_id=bob"}
        assert http.get(url, params={"channel": "user:alice"}, headers=bob).status_code == 403
        assert http.get(url, params={"channel": "secret"}, headers=bob).status_code == 403
    with stream(served, "bob", ["user:bob"]) as s:
        assert initial(s)["user"] == "bob"


def test_a_stream_starts_with_the_initial_state_and_announces_the_user_to_the_document(served: Served) -> None:
    with user(served, "alice") as alice:
        alice.post("/api/notifications", json={"title": "Before", "body": "connecting"})
    with stream(served, "alice") as s:
        state = initial(s)
        assert state["user"] == "alice"
        assert state["unreadCount"] == 1
        assert [n["title"] for n in state["notifications"]] == ["Before"]
        joined = s.next_event()
        assert (joined.event, data(joined)) == ("userJoined", {"userId": "alice", "name": "alice"})


def test_notifications_and_the_unread_count_are_live(served: Served) -> None:
    with stream(served, "alice") as s, user(served, "alice") as alice:
        initial(s)
        assert alice.post("/api/notifications", json={"title": "Hi", "body": "there"}).status_code == 201
        note, count = s.until_event("notification")[-1], s.next_event()
        assert {k: data(note)[k] for k in ("title", "body")} == {"title": "Hi", "body": "there"}
        assert (count.event, data(count)) == ("unreadCount", {"count": 1})
        assert note.id.isdigit()
        alice.post("/api/notifications/read")
        count = s.next_event()
        assert (count.event, data(count)) == ("unreadCount", {"count": 0})
        assert alice.get("/api/state").json()["unreadCount"] == 0


def test_notifications_reach_only_their_user(served: Served) -> None:
    with stream(served, "bob", ["user:bob"]) as s, user(served, "alice") as alice, user(served, "bob") as bob:
        initial(s)
        alice.post("/api/notifications", json={"title": "for alice"})
        bob.post("/api/notifications", json={"title": "for bob"})
        assert data(s.next_event())["title"] == "for bob"


def test_an_order_reaches_every_dashboard(served: Served) -> None:
    with stream(served, "alice") as a, stream(served, "bob") as b, user(served, "carol") as carol:
        assert carol.post("/api/orders", json={"total": 12.5, "customer": "Ada"}).status_code == 201
        for s in (a, b):
            order = s.until_event("newOrder")[-1]
            assert {k: data(order)[k] for k in ("total", "customer")} == {"total": 12.5, "customer": "Ada"}
            stats = s.next_event()
            assert stats.event == "statsUpdate"
            assert data(stats)["orders"] == 1
            assert data(stats)["revenue"] == 12.5
        assert carol.get("/api/state").json()["orders"][-1]["customer"] == "Ada"


def test_the_stats_are_refreshed_periodically() -> None:
    app = create_app(fast_settings(), admin_token=TOKEN, stats_interval=0.05, task_step=0)
    with serve(app) as served, stream(served, "alice", ["dashboard:stats"]) as s:
        initial(s)
        assert data(s.next_event())["orders"] == 0


def test_document_edits_and_the_raw_collaboration_endpoint(served: Served) -> None:
    with stream(served, "alice", ["document:d1"]) as s, user(served, "bob") as bob:
        initial(s)
        s.until_event("userJoined")
        with (
            open_stream(f"{served.url}/document/d1/live", headers={"Cookie": "user_id=bob"}) as live,
            httpx.Client(timeout=10) as anonymous,
        ):
            assert data(s.next_event()) == {"userId": "bob", "name": "bob"}
            assert data(live.next_event()) == {"userId": "bob", "name": "bob"}
            assert anonymous.get(f"{served.url}/document/d1/live").status_code == 401
            assert bob.post("/api/documents/d1/edit", json={"changes": "line 1"}).json() == {"success": True}
            for reader in (s, live):
                change = reader.next_event()
                assert change.event == "documentChanged"
                assert {k: data(change)[k] for k in ("changes", "userId")} == {"changes": "line 1", "userId": "bob"}
        assert bob.post("/api/documents/bad%20id/edit", json={"changes": "x"}).status_code == 422


def test_a_background_task_reports_progress_then_completion(served: Served) -> None:
    with stream(served, "alice", []) as s, user(served, "alice") as alice:
        initial(s)
        response = alice.post("/api/tasks", json={"items": 3})
        assert response.status_code == 202
        task_id = response.json()["taskId"]
        events = s.until_event("taskComplete")
        assert [(e.event, data(e)) for e in events] == [
            ("taskProgress", {"taskId": task_id, "current": 1, "total": 3, "percent": 33}),
            ("taskProgress", {"taskId": task_id, "current": 2, "total": 3, "percent": 67}),
            ("taskProgress", {"taskId": task_id, "current": 3, "total": 3, "percent": 100}),
            ("taskComplete", {"taskId": task_id, "result": "success"}),
        ]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/sse/admin/connections", None),
        ("POST", "/admin/publish", {"channel": "dashboard:alerts", "event": "alert", "data": {}}),
        ("POST", "/admin/announce", {"title": "t", "message": "m", "priority": "low"}),
    ],
)
def test_operator_routes_need_the_admin_token(served: Served, method: str, path: str, body: Any) -> None:
    with httpx.Client(base_url=served.url, timeout=10) as http:
        assert http.request(method, path, json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert http.request(method, path, json=body, headers=wrong).status_code == 403
        cookie_only = {"Cookie": "user_id=alice"}
        assert http.request(method, path, json=body, headers=cookie_only).status_code == 401
        right = {"Authorization": f"Bearer {TOKEN}"}
        assert http.request(method, path, json=body, headers=right).status_code == 200


def test_the_assistant_streams_a_run_that_only_its_user_may_view_or_stop(served: Served) -> None:
    with user(served, "alice") as alice, user(served, "bob") as bob:
        assert httpx.post(served.url + "/api/assistant", json={"prompt": "hi"}).status_code == 401
        response = alice.post("/api/assistant", json={"prompt": "hello there"})
        assert response.status_code == 202
        run_id = response.json()["runId"]
        assert run_id.startswith("alice.")
        with open_stream(f"{served.url}/sse/runs/{run_id}", headers={"Cookie": "user_id=alice"}, opened=False) as s:
            events = s.rest()
        assert [data(e)["text"] for e in events[:-1]] == answer_tokens("hello there")
        assert (events[-1].event, data(events[-1])) == (
            "end",
            {"status": "done", "result": {"text": canned_answer("hello there")}},
        )
        # Resumed from the middle (a reloaded page's ?last_event_id=): exactly the rest.
        resumed = alice.get(f"/sse/runs/{run_id}", params={"last_event_id": events[4].id})
        assert resumed.status_code == 200
        assert [line for line in resumed.text.splitlines() if line.startswith("id: ")] == [
            f"id: {e.id}" for e in events[5:]
        ]
        assert alice.get(f"/sse/runs/{run_id}", params={"last_event_id": events[-1].id}).status_code == 204
        # Another user's run: neither its stream nor its stop (a name prefix is not enough).
        assert bob.get(f"/sse/runs/{run_id}").status_code == 403
        assert bob.post(f"/sse/runs/{run_id}/cancel").status_code == 403
        with user(served, "alic") as alic:
            assert alic.get(f"/sse/runs/{run_id}").status_code == 403
        assert alice.post(f"/sse/runs/{run_id}/cancel").status_code == 404  # it has ended


def test_connection_stats_count_the_open_streams(served: Served) -> None:
    admin = {"Authorization": f"Bearer {TOKEN}"}
    with stream(served, "alice") as a, stream(served, "bob", []) as b, httpx.Client(timeout=10) as http:
        initial(a)
        initial(b)
        stats = http.get(f"{served.url}/sse/admin/connections", headers=admin).json()
        assert stats["total_connections"] == 2
        assert stats["by_channel"]["dashboard:stats"] == 1
        assert stats["by_channel"]["user:bob"] == 1


def test_an_operator_publishes_any_event_and_announces_to_everyone(served: Served) -> None:
    admin = {"Authorization": f"Bearer {TOKEN}"}
    with stream(served, "alice") as a, stream(served, "bob", []) as b, httpx.Client(timeout=10) as http:
        initial(a)
        initial(b)
        published = http.post(
            f"{served.url}/admin/publish",
            json={"channel": "dashboard:alerts", "event": "alert", "data": {"message": "disk"}, "id": "alert-1"},
            headers=admin,
        )
        assert published.json() == {"id": "alert-1"}
        alert = a.until_event("alert")[-1]
        assert (alert.id, data(alert)) == ("alert-1", {"message": "disk"})
        bad = http.post(
            f"{served.url}/admin/publish",
            json={"channel": "dashboard:alerts", "event": "error", "data": {}},
            headers=admin,
        )
        assert bad.status_code == 400
        announcement = {"title": "Hello", "message": "Maintenance at 6pm", "priority": "high"}
        http.post(f"{served.url}/admin/announce", json=announcement, headers=admin)
        for s in (a, b):
            assert data(s.until_event("announcement")[-1]) == announcement


def test_its_typed_events_are_in_openapi_and_the_asyncapi_document(served: Served) -> None:
    openapi = httpx.get(f"{served.url}/openapi.json").json()
    check_refs_resolve(openapi)
    content = openapi["paths"]["/sse/subscribe"]["get"]["responses"]["200"]["content"]["text/event-stream"]
    listed = {item["properties"]["event"].get("const") for item in content["itemSchema"]["anyOf"]}
    assert listed == {"notification", "unreadCount", "taskProgress", "taskComplete", None}
    asyncapi = httpx.get(f"{served.url}/sse/asyncapi.json").json()
    check_asyncapi(asyncapi)
    assert asyncapi["info"]["title"] == "fastapi-sse-channels example"
    assert "GET /sse/subscribe" in asyncapi["info"]["description"]
    (channel,) = asyncapi["channels"].values()
    assert channel["address"] == "user:{user_id}" and set(channel["parameters"]) == {"user_id"}


def test_an_operator_publishing_a_typed_event_with_bad_data_gets_400(served: Served) -> None:
    admin = {"Authorization": f"Bearer {TOKEN}"}
    with stream(served, "alice") as a, httpx.Client(timeout=10) as http:
        initial(a)
        bad = http.post(
            f"{served.url}/admin/publish",
            json={"channel": "user:alice", "event": "unreadCount", "data": {"count": -1}},
            headers=admin,
        )
        assert bad.status_code == 400
        assert "'unreadCount'" in bad.json()["detail"] and "count:" in bad.json()["detail"]
        good = {"channel": "user:alice", "event": "unreadCount", "data": {"count": 2}}
        assert http.post(f"{served.url}/admin/publish", json=good, headers=admin).status_code == 200
        # The refused event never reached the stream: the next unreadCount is the good one.
        assert data(a.until_event("unreadCount")[-1]) == {"count": 2}


def test_a_resume_past_the_history_gets_the_gap_event() -> None:
    app = create_app(fast_settings(history_size=1), admin_token=TOKEN, stats_interval=3600, task_step=0)
    with serve(app) as served, user(served, "alice") as alice:
        with stream(served, "alice", []) as s:
            initial(s)
            alice.post("/api/notifications", json={"title": "one"})
            cursor = s.until_event("unreadCount")[-1].id
        for title in ("two", "three"):
            alice.post("/api/notifications", json={"title": title})
        with stream(served, "alice", [], headers={"Last-Event-ID": cursor}, opened=False) as s:
            events = s.until_event("gap")
            gap = data(events[-1])
            assert gap == {"channels": ["user:alice"], "all": False, "last_event_id": cursor}
        assert [n["title"] for n in alice.get("/api/state").json()["notifications"]] == ["one", "two", "three"]


def test_the_app_reads_sse_settings_from_the_environment() -> None:
    env = {"SSE_RETRY_INTERVAL": "1.5", "EXAMPLE_ADMIN_TOKEN": "from-env"}
    with serve_process("example_app.main:app", env) as (url, _), httpx.Client(timeout=10) as http:
        stats = http.get(f"{url}/sse/admin/connections", headers={"Authorization": "Bearer from-env"})
        assert stats.status_code == 200
        with open_stream(f"{url}/sse/subscribe", headers={"Cookie": "user_id=alice"}) as s:
            assert s.retry is not None and 1200 <= s.retry <= 1800  # 1.5 s, spread by retry_jitter
            assert s.next_event().event == "initialState"


def test_two_workers_share_events_through_redis(redis_server: RedisServer) -> None:
    env = {
        "SSE_BACKEND": "redis",
        "SSE_REDIS_URL": redis_server.url,
        "SSE_REDIS_KEY_PREFIX": f"example-{uuid.uuid4().hex}:",
        "SSE_HEARTBEAT_INTERVAL": "3600",
    }
    with (
        serve_process("example_app.main:app", env) as (first, _),
        serve_process("example_app.main:app", env) as (second, _),
        open_stream(
            f"{second}/sse/subscribe", params={"channel": "dashboard:orders"}, headers={"Cookie": "user_id=bob"}
        ) as s,
        httpx.Client(base_url=first, cookies={"user_id": "alice"}, timeout=10) as alice,
    ):
        assert s.next_event().event == "initialState"
        assert alice.post("/api/orders", json={"total": 3.0, "customer": "Grace"}).status_code == 201
        order = s.until_event("newOrder")[-1]
        assert {k: data(order)[k] for k in ("total", "customer")} == {"total": 3.0, "customer": "Grace"}
