"""The example page's assistant in Chromium: a run's tokens through the page's own
EventSource, a reload mid-answer that resumes exactly, a stop from another tab, and a
viewer served by another process on the same Redis."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import pytest
from helpers.browser import serve_example, sign_in
from helpers.redis import RedisServer

from example_app.main import answer_tokens, canned_answer

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

pytestmark = pytest.mark.browser

expect = pytest.importorskip("playwright.sync_api").expect

PROMPT = "why is the sky blue"
FULL = canned_answer(PROMPT)
QUICK = {"EXAMPLE_TOKEN_INTERVAL": "0.01"}
# Slow enough that a reload or a stop lands mid-answer (about 55 tokens: 5 s).
STEADY = {"EXAMPLE_TOKEN_INTERVAL": "0.1"}
WHOLE_ANSWER_MS = 20_000


def ask(page: Page, prompt: str = PROMPT) -> str:
    """Submit a prompt; the page puts the run's id in its address."""
    page.fill("#prompt", prompt)
    page.click("#ask")
    page.wait_for_function("location.hash.startsWith('#run=')")
    run_id: str = page.evaluate("location.hash.slice('#run='.length)")
    return run_id


def run_log(page: Page) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = page.evaluate("window.runLog")
    return entries


def tokens_seen(page: Page, count: int) -> None:
    page.wait_for_function(f"window.runLog.filter(e => e.type === 'token').length >= {count}")


def rendered(page: Page) -> str:
    return page.locator("#assistant-answer").inner_text()


def test_a_prompts_tokens_appear_then_the_run_ends_done(page: Page) -> None:
    with serve_example(QUICK) as url:
        sign_in(page, url, "alice")
        run_id = ask(page)
        assert run_id.startswith("alice.")
        expect(page.locator("#assistant-status")).to_have_text("done", timeout=WHOLE_ANSWER_MS)
        expect(page.locator("#assistant-answer")).to_have_text(FULL)
        expect(page.locator("#stop")).to_be_disabled()
        entries = run_log(page)
        assert [e["data"]["text"] for e in entries if e["type"] == "token"] == answer_tokens(PROMPT)
        assert (entries[-1]["type"], entries[-1]["data"]) == ("end", {"status": "done", "result": {"text": FULL}})
        # The page closed its EventSource on the end: no reconnect.
        assert page.evaluate("window.runSource.readyState") == 2
        # The page's main stream carried on beside it.
        expect(page.locator("#connection-status")).to_have_text("open")


def test_a_reload_mid_answer_ends_with_exactly_the_full_answer(page: Page) -> None:
    with serve_example(STEADY) as url:
        sign_in(page, url, "bea")
        run_id = ask(page)
        tokens_seen(page, 5)
        before = page.evaluate(f"JSON.parse(sessionStorage.getItem('run:{run_id}'))")
        page.reload()
        expect(page.locator("#assistant-status")).to_have_text("done", timeout=WHOLE_ANSWER_MS)
        expect(page.locator("#assistant-answer")).to_have_text(FULL)
        after = [e["data"]["text"] for e in run_log(page) if e["type"] == "token"]
    assert before["status"] is None and before["text"]
    # The reloaded page got exactly the tokens after the one it had rendered last.
    assert before["text"] + "".join(after) == FULL
    assert len(answer_tokens(PROMPT)) - len(after) >= 5


def test_stop_from_another_tab_ends_the_run_as_cancelled_on_both(page: Page, context: BrowserContext) -> None:
    with serve_example(STEADY) as url:
        sign_in(page, url, "cleo")
        run_id = ask(page)
        tokens_seen(page, 2)
        other = context.new_page()
        other.goto(f"{url}/#run={run_id}")
        expect(other.locator("#signed-in-as")).to_have_text("cleo")
        tokens_seen(other, 3)
        expect(other.locator("#stop")).to_be_enabled()
        other.click("#stop")
        for tab in (page, other):
            expect(tab.locator("#assistant-status")).to_have_text("cancelled")
            expect(tab.locator("#stop")).to_be_disabled()
            assert run_log(tab)[-1]["data"] == {"status": "cancelled"}
        # The other tab replayed the run from its start: both show the same words, not all.
        assert rendered(page) == rendered(other)
        assert FULL.startswith(rendered(page)) and rendered(page) != FULL
        other.close()


def test_a_viewer_served_by_another_process_on_redis_gets_the_whole_answer(
    page: Page, context: BrowserContext, redis_server: RedisServer
) -> None:
    env = {
        **STEADY,
        "SSE_BACKEND": "redis",
        "SSE_REDIS_URL": redis_server.url,
        "SSE_REDIS_KEY_PREFIX": f"e2e-{uuid.uuid4().hex[:8]}:",
    }
    with serve_example(env) as producer_url, serve_example(env) as viewer_url:
        sign_in(page, producer_url, "dora")
        run_id = ask(page)  # the run's producer is the first process
        viewer = context.new_page()
        # Cookies are per host, not per port: dora is signed in on the second process too.
        viewer.goto(f"{viewer_url}/#run={run_id}")
        expect(viewer.locator("#signed-in-as")).to_have_text("dora")
        tokens_seen(viewer, 3)
        viewer.reload()  # resumes on the second process from what it rendered
        for tab in (page, viewer):
            expect(tab.locator("#assistant-status")).to_have_text("done", timeout=WHOLE_ANSWER_MS)
            expect(tab.locator("#assistant-answer")).to_have_text(FULL)
        assert run_log(viewer)[-1]["data"] == {"status": "done", "result": {"text": FULL}}
        viewer.close()
