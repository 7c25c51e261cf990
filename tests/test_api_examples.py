"""Every usage example, as the files under docs/examples/ show it, exercised through
a real uvicorn server and a real SSE client (and the client-side page in Chromium)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers.documents import check_asyncapi, check_refs_resolve
from helpers.servers import Served, serve
from helpers.streams import open_stream, raw_stream, soft_refusal

from docs.examples import (
    basic_endpoint,
    best_practices,
    broadcasting,
    channels,
    client_side,
    collaboration,
    configuration,
    connection_stats,
    dashboard,
    disconnect,
    llm_runs,
    message_format,
    notifications,
    progress,
    quick_start,
    typed_events,
)
from fastapi_sse import SSEService

ADMIN = {"Authorization": "Bearer admin-secret"}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def as_user(name: str) -> dict[str, str]:
    return {"X-User-Id": name}


def data(event: Any) -> Any:
    return json.loads(event.data)


@pytest.fixture(autouse=True)
def quick_heartbeat_free_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples read SSE_* variables at startup: keep heartbeats out of the way."""
    monkeypatch.setenv("SSE_HEARTBEAT_INTERVAL", "3600")
    monkeypatch.setenv("SSE_RETRY_INTERVAL", "0.5")


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def sse_of(served: Served) -> SSEService:
    service: SSEService = served.app.state.sse
    return service


def test_quick_start(http: httpx.Client) -> None:
    with serve(quick_start.app) as served:
        assert http.get(f"{served.url}/events").status_code == 401
        with open_stream(f"{served.url}/events", headers=as_user("alice")) as s:
            http.post(f"{served.url}/users/bob/notify")
            http.post(f"{served.url}/users/alice/notify")
            event = s.next_event()
            assert (event.event, data(event)) == ("notification", {"message": "You have a new message"})


def test_basic_endpoint_subscribes_the_user_channel_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="app")
    with serve(basic_endpoint.app) as served, open_stream(f"{served.url}/subscribe", headers=as_user("alice")) as s:
        (client,) = served.call(sse_of(served).get_clients)
        assert client.channels == {"user:alice"}
        served.call(sse_of(served).broadcast, "user:alice", "ping", {"n": 1})
        assert data(s.next_event()) == {"n": 1}
    record = next(r for r in caplog.records if r.getMessage() == "SSE client connected")
    assert (getattr(record, "client_id", None), getattr(record, "user_id", None)) == (client.id, "alice")


def test_client_side_page_and_its_stream(http: httpx.Client) -> None:
    with serve(client_side.app) as served:
        page = http.get(served.url)
        assert 'new EventSource("/subscribe"' in page.text
        assert 'addEventListener("notification"' in page.text
        with open_stream(f"{served.url}/subscribe", headers={"Cookie": "user_id=alice"}) as s:
            http.post(f"{served.url}/users/alice/notify", params={"message": "Hi"})
            event = s.next_event()
            assert (event.event, data(event)) == ("notification", {"message": "Hi"})


@pytest.mark.browser
def test_client_side_page_in_a_real_browser(http: httpx.Client) -> None:
    # Imported here: without Playwright this test is skipped, the rest of this file still runs.
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

    with serve(client_side.app) as served, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context()
            context.add_cookies([{"name": "user_id", "value": "alice", "url": served.url}])
            page = context.new_page()
            page.goto(served.url)
            page.wait_for_function("eventSource.readyState === EventSource.OPEN", timeout=10_000)
            http.post(f"{served.url}/users/alice/notify", params={"message": "Hello from the server"})
            page.wait_for_function(
                "document.querySelector('#notifications li')?.textContent === 'Hello from the server'",
                timeout=10_000,
            )
            page.click("#close")
            assert page.evaluate("eventSource.readyState") == 2  # CLOSED
        finally:
            browser.close()


def test_broadcasting_from_a_handler_and_from_a_background_job(http: httpx.Client) -> None:
    with (
        serve(broadcasting.app) as served,
        open_stream(f"{served.url}/events", headers=as_user("bob")) as s,
    ):
        sent = http.post(
            f"{served.url}/messages", json={"recipient_id": "bob", "content": "hi bob"}, headers=as_user("alice")
        )
        assert sent.status_code == 200
        message = s.next_event()
        assert message.event == "newMessage"
        assert data(message) == {"id": sent.json()["id"], "from": "alice", "content": "hi bob"}
        http.post(f"{served.url}/announcements", json={"title": "T", "message": "M", "priority": "high"})
        announcement = s.next_event()
        assert (announcement.event, data(announcement)) == (
            "announcement",
            {"title": "T", "message": "M", "priority": "high"},
        )


def test_channel_subscriptions_check_access_for_every_requested_channel(http: httpx.Client) -> None:
    with serve(channels.app) as served:
        url = f"{served.url}/subscribe"
        assert http.get(url, params={"channel": "team:blue"}, headers=as_user("alice")).status_code == 403
        assert http.get(url, params={"channel": "orders"}).status_code == 401
        params = [("channel", "orders"), ("channel", "notifications"), ("channel", "team:red")]
        with open_stream(url, params=params, headers=as_user("alice")):
            (client,) = served.call(sse_of(served).get_clients)
            assert client.channels == {"orders", "notifications", "team:red", "user:alice"}


def test_live_notifications_push_the_notification_and_the_unread_count(http: httpx.Client) -> None:
    with serve(notifications.app) as served:
        url = f"{served.url}/subscribe"
        # The user's channel comes from the sign-in, never from the query.
        assert http.get(url, params={"channel": "user:bob"}, headers=as_user("alice")).status_code == 403
        assert http.get(url).status_code == 401
        with open_stream(url, headers=as_user("alice")) as s:
            (client,) = served.call(sse_of(served).get_clients)
            assert client.channels == {"user:alice"}
            created = http.post(
                f"{served.url}/notifications", json={"title": "T", "body": "B"}, headers=as_user("alice")
            ).json()
            event = s.next_event()
            assert event.event == "notification"
            assert data(event) == {
                "id": created["id"],
                "title": "T",
                "body": "B",
                "type": "info",
                "createdAt": created["created_at"],
            }
            http.post(f"{served.url}/notifications/{created['id']}/read", headers=as_user("alice"))
            count = s.next_event()
            assert (count.event, data(count)) == ("unreadCount", {"count": 0})


def test_live_dashboard_initial_data_orders_and_periodic_stats(
    http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashboard, "STATS_INTERVAL", 0.05)
    monkeypatch.setattr(dashboard, "orders", [])
    with serve(dashboard.app) as served, open_stream(f"{served.url}/dashboard/live") as s:
        initial = s.next_event()
        assert (initial.event, data(initial)) == ("initialData", {"orders": 0, "revenue": 0})
        (client,) = served.call(sse_of(served).get_clients)
        assert client.channels == {"dashboard:stats", "dashboard:orders", "dashboard:alerts"}
        http.post(f"{served.url}/orders", json={"total": 9.5, "customer_name": "Ada"})
        order = s.until_event("newOrder")[-1]
        assert data(order) == {"id": 1, "total": 9.5, "customer": "Ada"}
        stats = s.until_event("statsUpdate")[-1]
        assert data(stats) == {"orders": 1, "revenue": 9.5}


def test_collaboration_checks_access_and_broadcasts_joins_and_changes(http: httpx.Client) -> None:
    with serve(collaboration.app) as served:
        url = f"{served.url}/document/roadmap/live"
        assert http.get(url, headers=as_user("mallory")).status_code == 403
        with open_stream(url, headers=as_user("alice")) as alice:
            assert data(alice.next_event()) == {"userId": "alice", "name": "Alice"}
            with open_stream(url, headers=as_user("bob")):
                joined = alice.next_event()
                assert (joined.event, data(joined)) == ("userJoined", {"userId": "bob", "name": "Bob"})
            edit = http.post(f"{served.url}/document/roadmap/edit", json={"changes": ["+1"]}, headers=as_user("bob"))
            assert edit.json() == {"success": True}
            change = alice.next_event()
            assert change.event == "documentChanged"
            assert {k: data(change)[k] for k in ("changes", "userId")} == {"changes": ["+1"], "userId": "bob"}
            denied = http.post(f"{served.url}/document/roadmap/edit", json={"changes": []}, headers=as_user("eve"))
            assert denied.status_code == 403


def test_progress_updates_from_a_background_job_are_a_run(http: httpx.Client) -> None:
    with serve(progress.app) as served:
        started = http.post(f"{served.url}/process", json={"data": ["a", "b"]}, headers=as_user("alice"))
        assert started.status_code == 202
        task_id = started.json()["taskId"]
        url = f"{served.url}/runs/{task_id}"
        with open_stream(url, headers=as_user("alice"), opened=False) as s:
            events = s.rest()
        assert [(e.event, data(e)) for e in events] == [
            ("taskProgress", {"taskId": task_id, "current": 1, "total": 2, "percent": 50}),
            ("taskProgress", {"taskId": task_id, "current": 2, "total": 2, "percent": 100}),
            ("end", {"status": "done", "result": {"processed": 2}}),
        ]
        # A reloaded page resumes from its last event: exactly the rest, then 204 at the end.
        with open_stream(url, headers={**as_user("alice"), "Last-Event-ID": events[0].id}, opened=False) as again:
            assert [e.id for e in again.rest()] == [e.id for e in events[1:]]
        assert http.get(url, headers={**as_user("alice"), "Last-Event-ID": events[-1].id}).status_code == 204
        # Nobody else follows or stops alice's task.
        assert http.get(url, headers=as_user("bob")).status_code == 403
        assert http.post(url + "/cancel", headers=as_user("bob")).status_code == 403
        assert http.get(url).status_code == 401


def test_an_llm_answer_as_a_run_is_stopped_from_anywhere(http: httpx.Client) -> None:
    with serve(llm_runs.app) as served:
        long_prompt = " ".join(f"word{i}" for i in range(200))  # about 10 s of tokens
        run_id = http.post(f"{served.url}/chat", json={"prompt": long_prompt}).json()["run_id"]
        with open_stream(f"{served.url}/runs/{run_id}", opened=False) as viewer:
            assert viewer.next_event().event == "token"
            with open_stream(f"{served.url}/chat/{run_id}/events", opened=False) as own:
                assert data(own.next_event()) == {"text": "You "}  # from the start
                assert http.post(f"{served.url}/chat/{run_id}/stop").json() == {"stopping": True}
                own_rest = own.rest()
            rest = viewer.rest()
        for events in (rest, own_rest):
            assert (events[-1].event, data(events[-1])) == ("end", {"status": "cancelled"})
            assert {e.event for e in events[:-1]} <= {"token"}
        assert len(rest) < 200
        assert http.post(f"{served.url}/runs/{run_id}/cancel").status_code == 404
        assert http.post(f"{served.url}/chat/{run_id}/stop").json() == {"stopping": False}


def test_message_format_is_exactly_the_documented_frame() -> None:
    expected = b'id: msg-123\nevent: notification\ndata: {"message":"Hello"}\n\n'
    with serve(message_format.app) as served, raw_stream(served.port, "/hello") as raw:
        assert raw.read_until(expected).endswith(expected)


def test_connection_stats_from_get_clients_and_from_the_router(http: httpx.Client) -> None:
    with serve(connection_stats.app) as served:
        assert http.get(f"{served.url}/admin/summary").status_code == 401
        assert http.get(f"{served.url}/admin/connections").status_code == 401
        with (
            open_stream(f"{served.url}/subscribe", params={"channel": ["a", "b"]}),
            open_stream(f"{served.url}/subscribe", params={"channel": "a"}),
        ):
            summary = http.get(f"{served.url}/admin/summary", headers=ADMIN).json()
            assert summary["totalConnections"] == 2
            assert summary["byChannel"] == {"a": 2, "b": 1}
            oldest = min(c.created_at for c in served.call(sse_of(served).get_clients))
            assert summary["oldestConnection"] == oldest.isoformat().replace("+00:00", "Z")
            stats = http.get(f"{served.url}/admin/connections", headers=ADMIN).json()
            assert (stats["total_connections"], stats["by_channel"]) == (2, {"a": 2, "b": 1})


def test_graceful_disconnect_and_shutdown_end_the_streams(http: httpx.Client) -> None:
    with serve(disconnect.app) as served:
        url = f"{served.url}/subscribe"
        with open_stream(url, params={"channel": "a"}) as first, open_stream(url, params={"channel": "a"}) as second:
            one, _ = served.call(sse_of(served).get_clients)
            assert http.delete(f"{served.url}/admin/clients/{one.id}").status_code == 401
            assert http.delete(f"{served.url}/admin/clients/{one.id}", headers=ADMIN).status_code == 204
            assert first.rest() == []
            assert http.delete(f"{served.url}/admin/clients/{one.id}", headers=ADMIN).status_code == 404
            served.call(sse_of(served).broadcast, "a", "still", {"here": True})
            assert data(second.next_event()) == {"here": True}
            served.call(sse_of(served).shutdown)
            assert second.rest() == []
            assert "shutting down" in soft_refusal(http.get(url, params={"channel": "a"}))


def test_best_practice_specific_channels() -> None:
    with serve(best_practices.app) as served, open_stream(f"{served.url}/orders/o1/live", headers=as_user("bob")):
        (client,) = served.call(sse_of(served).get_clients)
        assert client.channels == {"user:bob", "order:o1", "team:blue"}


def test_best_practice_event_ids_let_a_client_resume() -> None:
    with serve(best_practices.app) as served:
        sse = sse_of(served)
        with open_stream(f"{served.url}/orders/o1/live", headers=as_user("bob")) as s:
            served.call(best_practices.order_shipped, sse, "o1")
            first = s.next_event()
            assert first.id.startswith("evt-")
        served.call(sse.broadcast, "user:bob", "missed", {"n": 2})
        resume = {**as_user("bob"), "Last-Event-ID": first.id}
        # /events reads only user:bob, so an id of order:o1 is unknown to it (resume is
        # no oracle for other channels): it says what may be lost instead of skipping.
        with open_stream(f"{served.url}/events", headers=resume, opened=False) as s:
            gap = s.next_event()
            assert (gap.event, data(gap)["channels"]) == ("gap", ["user:bob"])
        # From an id of a channel it reads, the resume is exact.
        with open_stream(f"{served.url}/events", headers=as_user("bob")) as s:
            served.call(sse.broadcast, "user:bob", "seen", {"n": 3}, "evt-bob-3")
            seen = s.next_event()
        served.call(sse.broadcast, "user:bob", "missed", {"n": 4})
        resume = {**as_user("bob"), "Last-Event-ID": seen.id}
        with open_stream(f"{served.url}/events", headers=resume, opened=False) as s:
            missed = s.next_event()
            assert (missed.event, data(missed)) == ("missed", {"n": 4})


def test_best_practice_initial_state() -> None:
    with serve(best_practices.app) as served, open_stream(f"{served.url}/subscribe", headers=as_user("alice")) as s:
        event = s.next_event()
        assert (event.event, data(event)) == ("initialState", {"unreadNotifications": 3, "online": True})


def test_best_practice_client_limits_remove_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(best_practices, "MAX_STREAMS_PER_USER", 2)
    with serve(best_practices.app) as served:
        url = f"{served.url}/limited"
        with (
            open_stream(url, headers=as_user("alice")) as oldest,
            open_stream(url, headers=as_user("alice")),
            open_stream(url, headers=as_user("alice")),
        ):
            assert oldest.rest() == []
            assert len(served.call(sse_of(served).get_clients)) == 2


def test_best_practice_small_payloads() -> None:
    with serve(best_practices.app) as served, open_stream(f"{served.url}/orders/o7/live", headers=as_user("bob")) as s:
        order = {"id": "o7", "status": "shipped", "items": [{"sku": "x"}] * 50, "customer": {"name": "Ada"}}
        served.call(best_practices.order_updated, sse_of(served), order)
        event = s.next_event()
        assert data(event) == {"orderId": "o7", "status": "shipped"}


def test_configuration_sets_the_retry_hint_and_heartbeat() -> None:
    assert (configuration.settings.heartbeat_interval, configuration.settings.retry_interval) == (30.0, 3.0)
    with serve(configuration.app) as served, open_stream(f"{served.url}/subscribe") as s:
        # retry_interval, spread by retry_jitter (20 % by default) for each stream.
        assert s.retry is not None and 2400 <= s.retry <= 3600


def test_typed_events_are_validated_sent_as_json_and_documented(http: httpx.Client) -> None:
    alice = as_user("alice")
    with serve(typed_events.app) as served, open_stream(f"{served.url}/events", headers=alice) as s:
        sse: SSEService = typed_events.app.state.sse
        assert http.post(f"{served.url}/notify", headers=alice).status_code == 200
        assert (s.next_event().event, s.frames[-1].data) == ("notification", '{"title":"Welcome","unread":1}')
        before = sse.stats().events_published
        bad = http.post(f"{served.url}/progress", json={"taskId": "t1", "percent": 101}, headers=alice)
        assert bad.status_code == 422
        assert bad.json()["detail"] == (
            "event 'progress' data does not fit Progress: percent: Input should be less than or equal to 100"
        )
        assert sse.stats().events_published == before
        assert http.post(f"{served.url}/progress", json={"taskId": "t1", "percent": "50"}, headers=alice).is_success
        assert (s.next_event().event, s.frames[-1].data) == ("progress", '{"taskId":"t1","percent":50}')
        openapi = http.get(f"{served.url}/openapi.json").json()
        asyncapi = http.get(f"{served.url}/asyncapi.json").json()
    check_refs_resolve(openapi)
    items = openapi["paths"]["/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]["itemSchema"]
    assert [item["properties"]["event"].get("const") for item in items["anyOf"]] == ["notification", "progress", None]
    assert {"Notification", "Progress"} <= set(openapi["components"]["schemas"])
    check_asyncapi(asyncapi)
    assert (asyncapi["info"]["title"], asyncapi["info"]["version"]) == ("Typed events", "1.0.0")
