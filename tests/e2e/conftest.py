"""Browser fixtures: Debian's Chromium driven by Playwright (imported by the fixtures,
so that collecting needs no Playwright); the helpers are in ``helpers.browser``."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from helpers.browser import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS, TIMEOUT_MS

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, Playwright


# Module scope, not session: while Playwright's sync API runs, its event loop counts as
# the thread's running loop, which would break every asyncio test collected after these.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    from playwright.sync_api import sync_playwright

    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: run 'make system-deps' (apt-get install chromium)")
    with sync_playwright() as instance:
        yield instance


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    from playwright.sync_api import expect

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
