"""The example page in Chromium: every event arrives through the page's own EventSource."""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING

import pytest
from helpers.browser import SCREENSHOTS, admin_post, log, serve_example, sign_in
from helpers.paths import ROOT
from helpers.redis import RedisServer
from helpers.servers import free_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.browser

# Every test here drives Chromium: without Playwright this module is skipped, the rest
# of the suite still collects and runs.
expect = pytest.importorskip("playwright.sync_api").expect

README_SCREENSHOT = ROOT / "docs" / "img" / "example-page.png"
HAS_REDIS_BACKEND = (ROOT / "fastapi_sse" / "backends" / "redis.py").exists()


def test_signed_in_page_receives_its_events(page: Page) -> None:
    with serve_example() as url:
        sign_in(page, url, "alice")
        expect(page.locator("#document-events li").first).to_have_text("alice joined")

        page.click("#send-notification")
        expect(page.locator("#notifications li")).to_have_count(1)
        expect(page.locator("#notifications li").first).to_contain_text("Notification 1")
        expect(page.locator("#unread-count")).to_have_text("1")
        page.click("#send-notification")
        expect(page.locator("#notifications li")).to_have_count(2)
        expect(page.locator("#unread-count")).to_have_text("2")

        page.click("#new-order")
        expect(page.locator("#orders li")).to_have_count(1)
        expect(page.locator("#dashboard-stats")).to_contain_text("Orders: 1")

        page.click("#edit-document")
        expect(page.locator("#document-events li").first).to_contain_text("alice changed: line")

        page.click("#start-task")
        expect(page.locator("#task-status")).to_have_text("complete", timeout=20_000)
        expect(page.locator("#task-progress")).to_have_js_property("value", 100)

        admin_post(url, "/admin/announce", {"title": "Hello", "message": "Maintenance at 6pm", "priority": "high"})
        expect(page.locator("#announcements li").first).to_have_text("[high] Hello — Maintenance at 6pm")
        expect(page.locator("#connection-status")).to_have_text("open")
        page.mouse.click(1, 1)  # no button keeps the focus ring in the picture
        page.screenshot(path=SCREENSHOTS / "signed-in-page.png")
        # The README's picture is refreshed on request only, so a test run leaves git clean.
        if os.environ.get("UPDATE_README_SCREENSHOT") == "1" or not README_SCREENSHOT.exists():
            README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=README_SCREENSHOT)

        page.click("#mark-read")
        expect(page.locator("#unread-count")).to_have_text("0")
        types = [entry["type"] for entry in log(page)]
        progress = [e["data"]["current"] for e in log(page) if e["type"] == "taskProgress"]
    for expected in ("notification", "unreadCount", "newOrder", "statsUpdate", "documentChanged", "announcement"):
        assert expected in types
    assert types.count("notification") == 2
    assert types.count("unreadCount") == 3
    assert progress == list(range(1, 11))
    assert types.index("taskComplete") > max(i for i, t in enumerate(types) if t == "taskProgress")
    assert "gap" not in types
    # One stream carried every channel, and the ids only grew.
    ids = [int(e["id"]) for e in log(page) if e["id"].isdigit()]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_page_never_receives_another_users_channel(page: Page) -> None:
    with serve_example() as url:
        sign_in(page, url, "alice")
        bob = {"id": 1, "title": "for bob only", "body": "", "type": "info", "createdAt": ""}
        alice = {**bob, "id": 2, "title": "for alice"}
        admin_post(url, "/admin/publish", {"channel": "user:bob", "event": "notification", "data": bob})
        admin_post(url, "/admin/publish", {"channel": "user:alice", "event": "notification", "data": alice})
        # One process delivers in publication order: once alice's arrives, bob's never will.
        expect(page.locator("#notifications li").first).to_have_text("for alice")
        expect(page.locator("#notifications li")).to_have_count(1)
        titles = [e["data"]["title"] for e in log(page) if e["type"] == "notification"]
        assert titles == ["for alice"]

        # Nor can the page's script open a stream on bob's channel: 403, and a browser
        # does not retry after a non-200 answer.
        state = page.evaluate(
            """() => new Promise((resolve) => {
                const spy = new EventSource("/sse/subscribe?channel=user:bob", { withCredentials: true });
                spy.onopen = () => { spy.close(); resolve("open"); };
                spy.onerror = () => { if (spy.readyState === EventSource.CLOSED) resolve("closed"); };
            })"""
        )
        assert state == "closed"
        expect(page.locator("#connection-status")).to_have_text("open")


def test_two_users_share_the_dashboard_but_not_their_notifications(page: Page, browser: Browser) -> None:
    other = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        bob = other.new_page()
        with serve_example() as url:
            sign_in(page, url, "alice")
            sign_in(bob, url, "bob")
            bob.click("#send-notification")
            expect(bob.locator("#unread-count")).to_have_text("1")
            bob.click("#new-order")
            expect(page.locator("#orders li")).to_have_count(1)
            expect(page.locator("#dashboard-stats")).to_contain_text("Orders: 1")
            admin_post(url, "/admin/announce", {"title": "Both", "message": "", "priority": "normal"})
            expect(page.locator("#announcements li").first).to_have_text("[normal] Both")
            expect(bob.locator("#announcements li").first).to_have_text("[normal] Both")
            # The announcement came after bob's notification: alice would have it by now.
            expect(page.locator("#notifications li")).to_have_count(0)
            expect(page.locator("#unread-count")).to_have_text("0")
            assert [e for e in log(page) if e["type"] in ("notification", "unreadCount")] == []
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            bob.screenshot(path=SCREENSHOTS / "test_two_users_bob.png", full_page=True)
    finally:
        other.close()


def test_restart_without_history_sends_gap_and_the_page_reloads(page: Page) -> None:
    port = free_port()
    with serve_example(port=port) as url:
        sign_in(page, url, "dora")
        page.click("#send-notification")
        expect(page.locator("#unread-count")).to_have_text("1")
        last_id = log(page)[-1]["id"]
        expect(page.locator("#reload-notice")).to_be_hidden()
    expect(page.locator("#connection-status")).to_have_text("connecting")

    # The memory backend forgets everything: the page's Last-Event-ID cannot be replayed.
    with serve_example(port=port) as url:
        expect(page.locator("#reload-notice")).to_be_visible()
        expect(page.locator("#reload-notice")).to_contain_text("reloaded")
        expect(page.locator("#reload-count")).to_have_text("1")
        expect(page.locator("#connection-status")).to_have_text("open")
        # The reloaded state is the new server's: no notification survived.
        expect(page.locator("#unread-count")).to_have_text("0")
        expect(page.locator("#notifications li")).to_have_count(0)
        gaps = [e for e in log(page) if e["type"] == "gap"]
    assert len(gaps) == 1
    assert gaps[0]["data"]["last_event_id"] == last_id
    assert "user:dora" in gaps[0]["data"]["channels"]


@pytest.mark.skipif(not HAS_REDIS_BACKEND, reason="needs fastapi_sse/backends/redis.py (the Redis backend)")
def test_resume_after_restart_replays_exactly_the_missed_events(page: Page, redis_server: RedisServer) -> None:
    env = {
        "SSE_BACKEND": "redis",
        "SSE_REDIS_URL": redis_server.url,
        "SSE_REDIS_KEY_PREFIX": f"e2e-{uuid.uuid4().hex[:8]}:",
    }
    port = free_port()
    with serve_example(env, port=port) as url:
        sign_in(page, url, "carol")
        admin_post(
            url, "/admin/publish", {"channel": "dashboard:alerts", "event": "alert", "data": {"message": "live"}}
        )
        expect(page.locator("#announcements li").first).to_have_text("alert: live")
    expect(page.locator("#connection-status")).to_have_text("connecting")

    # While the page's server is down, another worker on the same Redis publishes.
    with serve_example(env) as other:
        missed = [
            admin_post(
                other, "/admin/publish", {"channel": "dashboard:alerts", "event": "alert", "data": {"message": m}}
            )
            for m in ("missed-1", "missed-2")
        ]
        progress = {"taskId": "t1", "current": 3, "total": 10, "percent": 30}
        missed.append(
            admin_post(other, "/admin/publish", {"channel": "user:carol", "event": "taskProgress", "data": progress})
        )
        missed_ids = [m["id"] for m in missed]
    assert [e["id"] for e in log(page) if e["id"] in missed_ids] == []

    # Back on the same port: the EventSource reconnects by itself with its Last-Event-ID.
    with serve_example(env, port=port) as url:
        expect(page.locator("#connection-status")).to_have_text("open")
        expect(page.locator("#task-status")).to_have_text("running 3/10")
        expect(page.locator("#announcements li")).to_have_text(["alert: missed-2", "alert: missed-1", "alert: live"])
        # A live event after the replay proves the stream is live and nothing is repeated.
        admin_post(
            url, "/admin/publish", {"channel": "dashboard:alerts", "event": "alert", "data": {"message": "after"}}
        )
        expect(page.locator("#announcements li")).to_have_text(
            ["alert: after", "alert: missed-2", "alert: missed-1", "alert: live"]
        )
        entries = log(page)
    replayed = [e["id"] for e in entries if e["id"] in missed_ids]
    assert replayed == missed_ids  # each once, in publication order
    assert "gap" not in [e["type"] for e in entries]
