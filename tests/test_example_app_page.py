"""The example app's page and its sign-in: request bodies are bounded, the page says
the sign-in is a demo, and the operator command names the server the page came from."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import httpx
import pytest
from helpers.apps import fast_settings
from helpers.servers import Served, serve

from example_app.main import MAX_BODY_BYTES, create_app

TOO_BIG = b"user_id=alice&padding=" + b"x" * MAX_BODY_BYTES


@pytest.fixture
def served() -> Iterator[Served]:
    with serve(create_app(fast_settings(), admin_token="t", stats_interval=3600, task_step=0)) as served:
        yield served


def chunks(body: bytes, size: int = 4096) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_a_login_body_over_the_limit_is_refused(served: Served) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    with httpx.Client(base_url=served.url, timeout=10) as http:
        announced = http.post("/login", content=TOO_BIG, headers=form)
        assert announced.status_code == 413
        # Without Content-Length (chunked), the body is cut off as it arrives.
        streamed = http.post("/login", content=chunks(TOO_BIG), headers=form)
        assert "content-length" not in streamed.request.headers
        assert streamed.status_code == 413
        assert "user_id" not in streamed.cookies
        assert http.post("/login", data={"user_id": "alice"}).status_code == 303


def test_a_json_body_over_the_limit_is_refused(served: Served) -> None:
    body = b'{"title": "t", "body": "' + b"x" * MAX_BODY_BYTES + b'"}'
    with httpx.Client(base_url=served.url, cookies={"user_id": "alice"}, timeout=10) as http:
        response = http.post("/api/notifications", content=chunks(body), headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        assert http.post("/api/notifications", json={"title": "t"}).status_code == 201


def test_the_page_says_the_sign_in_is_a_demo(served: Served) -> None:
    page = httpx.get(served.url, timeout=10).text
    assert "A demo sign-in" in page
    assert "unsigned cookie" in page
    assert "127.0.0.1:8000" not in page


@pytest.mark.browser
def test_the_operator_command_names_the_pages_own_origin(served: Served) -> None:
    # Imported here: without Playwright this test is skipped, the rest of this file still runs.
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(served.url)
            command = page.locator("#announce-command")
            command.filter(has_text=f"{served.url}/admin/announce").wait_for(timeout=10_000)
            assert "127.0.0.1:8000" not in command.inner_text()
        finally:
            browser.close()
