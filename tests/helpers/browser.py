"""The browser tests' helpers: Debian's Chromium, the example app in a uvicorn process,
and the example page driven through Playwright (imported only where a page is used)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx

from .paths import ROOT
from .servers import free_port, serve_process

if TYPE_CHECKING:
    from playwright.sync_api import Page

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
    from playwright.sync_api import expect

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
