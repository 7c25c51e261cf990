"""Browser fixtures: Debian's Chromium driven by Playwright, the example app in a uvicorn process."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from helpers.paths import ROOT
from helpers.servers import free_port, serve_process
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, expect, sync_playwright

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOTS = ROOT / "test-output" / "screenshots"
ADMIN_TOKEN = "e2e-admin-token"
TIMEOUT_MS = 10_000

# Small intervals: a browser reconnects half a second after a stream drops.
APP_ENV = {
    "EXAMPLE_ADMIN_TOKEN": ADMIN_TOKEN,
    "SSE_RETRY_INTERVAL": "0.5",
    "SSE_HEARTBEAT_INTERVAL": "5",
}


# Module scope, not session: while Playwright's sync API runs, its event loop counts as
# the thread's running loop, which would break every asyncio test collected after these.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: run 'make system-deps' (apt-get install chromium)")
    with sync_playwright() as instance:
        yield instance


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    # Never a downloaded browser: the system's Chromium.
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    expect.set_options(timeout=TIMEOUT_MS)
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def page(context: BrowserContext, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A page that leaves a screenshot of how it ended in test-output/screenshots/."""
    page = context.new_page()
    try:
        yield page
    finally:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SCREENSHOTS / f"{request.node.name}.png", full_page=True)


@contextmanager
def serve_example(env: dict[str, str] | None = None, *, port: int | None = None) -> Iterator[str]:
    """The example app served by uvicorn in its own process; yields its base URL."""
    with serve_process("example_app.main:app", {**APP_ENV, **(env or {})}, port=port or free_port()) as (url, _):
        yield url


def admin_post(url: str, path: str, body: dict[str, Any]) -> Any:
    """An operator call (Bearer token), as a back office would make it."""
    response = httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def sign_in(page: Page, url: str, user: str) -> None:
    """Sign in through the page's form and wait for its stream to open."""
    page.goto(url + "/")
    page.fill("#user-id", user)
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#signed-in-as")).to_have_text(user)
    expect(page.locator("#connection-status")).to_have_text("open")
    # The stream is live once the initial state sent on connect has arrived.
    page.wait_for_function("window.sseLog.some(e => e.type === 'initialState')")


def log(page: Page) -> list[dict[str, Any]]:
    """Every event the page's EventSource dispatched: ``{type, id, data}``."""
    entries: list[dict[str, Any]] = page.evaluate("window.sseLog")
    return entries
