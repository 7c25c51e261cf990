"""The documentation stays true: its code is tested files, its settings table is
generated from SSESettings, the README's snippet runs, and the site builds strictly."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from helpers.apps import router_app
from helpers.paths import ROOT
from helpers.servers import free_port, serve, wait_for_port
from helpers.streams import open_stream

import fastapi_sse
from docs.examples import minimal, publishing, testing_your_app
from fastapi_sse import SSESettings
from fastapi_sse.testing import live_server, open_event_stream

DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
SNIPPET = re.compile(r'--8<-- "docs/examples/([^":]+)(?::([^"]+))?"')


def pages() -> list[Path]:
    return [p for p in DOCS.rglob("*.md") if p.relative_to(DOCS).parts[0] not in {"examples", "hooks"}]


def snippets() -> list[tuple[Path, str, str | None]]:
    return [(page, m[1], m[2]) for page in pages() for m in SNIPPET.finditer(page.read_text())]


def load_hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("settings_table_hook", DOCS / "hooks" / "settings_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_minimal_example_streams_what_a_handler_broadcasts() -> None:
    with (
        serve(minimal.app) as served,
        open_stream(f"{served.url}/subscribe", params={"channel": "order:17"}) as s,
        httpx.Client(timeout=10) as http,
    ):
        http.post(f"{served.url}/orders/17/ship")
        event = s.next_event()
        assert (event.event, json.loads(event.data)) == ("orderShipped", {"orderId": "17"})


def test_publishing_from_anywhere_reaches_each_audience() -> None:
    app = router_app()
    with serve(app) as served:
        url = f"{served.url}/subscribe"
        with (
            open_stream(url, params=[("channel", "user:42"), ("channel", "orders"), ("channel", "logs")]) as s,
            open_stream(url, params={"channel": "elsewhere"}) as other,
        ):
            sse = app.state.sse
            (client, _) = sorted(served.call(sse.get_clients), key=lambda c: len(c.channels), reverse=True)
            event_id = served.call(publishing.publish_everywhere, sse, client, {"id": 1})
            got = [(e.event, e.data) for e in s.events(5)]
            assert got == [
                ("notification", '{"message":"hi"}'),
                ("announcement", '{"title":"Deploy at 6pm"}'),
                ("initialState", '{"unread":3}'),
                ("line", "sent as is, not as JSON"),
                ("newOrder", '{"id":1}'),
            ]
            assert s.frames[-1].id == event_id
            assert other.next_event().event == "announcement"


def test_the_testing_page_example_passes() -> None:
    testing_your_app.test_order_shipped_reaches_the_subscriber()


def test_testing_helpers_skip_frames_a_browser_does_not_dispatch() -> None:
    with (
        live_server(minimal.app) as url,
        open_event_stream(url + "/subscribe", params={"channel": "order:1"}) as events,
    ):
        # The stream opens with retry: and an id-only cursor frame: neither is an event.
        httpx.post(url + "/orders/1/ship")
        httpx.post(url + "/orders/1/ship")
        assert [e.event for e in events.events(2)] == ["orderShipped", "orderShipped"]


def test_httpx_sse_sees_the_opening_as_the_non_browser_clients_page_says() -> None:
    with serve(minimal.app) as served, open_stream(f"{served.url}/subscribe?channel=a", opened=False) as s:
        retry, cursor = s.next_frame(), s.next_frame()
    assert (retry.event, retry.data) == ("message", "")
    assert retry.retry is not None and 2400 <= retry.retry <= 3600  # 3 s, spread by retry_jitter
    assert (cursor.event, cursor.data, cursor.id) == ("message", "", "0")
    page = (DOCS / "non-browser-clients.md").read_text()
    assert "`message` event with empty `data`, `retry=2874`" in page
    assert '`message` event with empty `data`, `id="0"`' in page


def test_open_event_stream_reports_a_refused_stream() -> None:
    with (
        live_server(minimal.app) as url,
        pytest.raises(httpx.HTTPStatusError),
        open_event_stream(url + "/subscribe", params={"channel": "bad name"}),
    ):
        pass


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_says_what_and_why_then_install_quick_start_and_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    headings = [line for line in lines if line.startswith("## ")]
    assert headings[:4] == ["## Why", "## Install", "## Quick start", "## Working on the project"]
    make_run = next(i for i, line in enumerate(lines) if line.startswith("make run "))
    assert lines[make_run + 1].startswith("make test ")
    assert make_run < 100, "the two commands are within the first two screens"


def test_readme_figures_are_those_of_the_performance_page() -> None:
    readme = (ROOT / "README.md").read_text()
    why = readme[readme.index("## Why") : readme.index("## Install")]
    figures = re.findall(r"\b\d[\d,.]*\d\b", why.replace("2-core", "").replace("0.120.1", ""))
    # Thousands separators aside (the tables write 63535.4, the README 63,535).
    performance = (DOCS / "performance.md").read_text().replace(",", "")
    assert figures, "the comparison quotes measured figures"
    assert [f for f in figures if f.replace(",", "") not in performance] == []


def test_readme_usage_is_the_tested_minimal_example() -> None:
    assert (EXAMPLES / "minimal.py").read_text() in readme_blocks("python")


def test_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    """The install line brings uvicorn; the app file, the uvicorn command and the two
    curl lines, run as the README shows them (on a free port), print the event shown."""
    (install,) = readme_blocks("sh")[0].splitlines()
    assert install.split("#")[0].split() == ["pip", "install", '"fastapi-sse-channels[server]"']
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "fastapi_sse").symlink_to(ROOT / "fastapi_sse")
    (tmp_path / "app.py").write_text(readme_blocks("python")[0])
    (command,) = readme_blocks("sh")[1].splitlines()
    subscribe, publish = readme_blocks("sh")[2].splitlines()
    expected = readme_blocks("text")[0]
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SSE_")}, "PYTHONPATH": str(tmp_path / "lib")}
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bin_dir / command.split()[0]), *command.split()[1:], "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=server)
        here = f"127.0.0.1:{port}"
        # curl ends by itself at --max-time: every read below has a deadline.
        curl = [*shlex.split(subscribe.replace("127.0.0.1:8000", here)), "--silent", "--max-time", "20"]
        with subprocess.Popen(curl, stdout=subprocess.PIPE, text=True) as stream:
            assert stream.stdout is not None
            got = [stream.stdout.readline() for _ in range(4)]  # the opening, before publishing
            assert (
                subprocess.run(shlex.split(publish.replace("127.0.0.1:8000", here)), capture_output=True).returncode
                == 0
            )
            got += [stream.stdout.readline() for _ in range(4)]
            stream.kill()
        # The retry delay is each stream's own: 3 s, spread by up to 20 %.
        delay = int(got[0].removeprefix("retry: "))
        assert 2400 <= delay <= 3600
        assert "".join(got).replace(f"retry: {delay}", "retry: 2874").rstrip("\n") == expected.rstrip("\n")
    finally:
        server.terminate()
        server.wait(15)


def test_readme_screenshot_path_works_on_github_below_the_quick_start() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(/docs/img/example-page.png)" in readme
    assert readme.index("(/docs/img/example-page.png)") > readme.index("make test")
    assert (ROOT / "docs" / "img" / "example-page.png").is_file()


def test_settings_table_has_every_field_with_its_env_var_and_description() -> None:
    table = load_hook().settings_table()
    rows = {line.split("|")[1].strip(" `"): line for line in table.splitlines()[2:]}
    assert len(rows) == len(SSESettings.model_fields)
    for name, field in SSESettings.model_fields.items():
        row = rows[f"SSE_{name.upper()}"]
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert cells[1] == f"`{name}`", name
        assert cells[3].strip("`").replace("_", "") == str(field.get_default()).replace("_", ""), name
        assert (field.description or "").replace("|", "\\|") in row, name


def test_the_configuration_page_asks_for_the_generated_table() -> None:
    assert load_hook().MARKER in (DOCS / "configuration.md").read_text()


def test_every_example_file_is_shown_in_a_page() -> None:
    shown = {name for _, name, _ in snippets()}
    files = {p.name for p in EXAMPLES.iterdir() if p.suffix in {".py", ".html"} and p.name != "__init__.py"}
    assert files - shown == set()


def test_every_snippet_section_exists_and_every_section_is_shown() -> None:
    wanted = {(name, section) for _, name, section in snippets() if section}
    for name, section in wanted:
        assert f"--8<-- [start:{section}]" in (EXAMPLES / name).read_text(), (name, section)
    defined = {
        (path.name, m[1])
        for path in EXAMPLES.glob("*.py")
        for m in re.finditer(r"--8<-- \[start:([^\]]+)\]", path.read_text())
    }
    assert defined - wanted == set()


def test_every_example_module_is_exercised_by_a_test() -> None:
    tests = "".join(
        (ROOT / "tests" / name).read_text() for name in ("test_api_examples.py", "test_examples_standalone.py")
    )
    tests += Path(__file__).read_text()
    modules = {p.stem for p in EXAMPLES.glob("*.py")}
    untested = {m for m in modules if not re.search(rf"\b{m}\.(app|settings|\w+)\b", tests)}
    assert untested == set()


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p for p in pages() if f": {p.relative_to(DOCS).as_posix()}" not in nav]
    assert missing == []


def test_the_site_builds_without_warnings(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        # The hooks and the API reference import the package of this checkout.
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    configuration = (tmp_path / "configuration" / "index.html").read_text()
    for name in SSESettings.model_fields:
        assert f"SSE_{name.upper()}" in configuration
    message_format = (tmp_path / "usage" / "message-format" / "index.html").read_text()
    assert "send_hello" in message_format
    reference = (tmp_path / "reference" / "index.html").read_text()
    assert [name for name in fastapi_sse.__all__ if f'id="fastapi_sse.{name}"' not in reference] == []
    documented = re.findall(r'id="fastapi_sse\.([\w.]+)"', reference)
    # In the order an app meets them, and none of the internals.
    first = ["create_sse_router", "allow_all", "SSEDep", "get_sse"]
    assert documented[:4] == first
    assert documented.index("SSEService.add_client") < documented.index("SSESettings")
    internal = {"push", "take", "take_frames", "wake", "mark_closed", "enforce_identity_limit"}
    internal |= {"announce", "withdraw", "peers", "claim", "release", "expire", "publish_nowait"}
    # Coordination's methods are its contract, for a shared backend of one's own.
    contract = ("Coordination.", "NoCoordination.")
    assert [n for n in documented if n.rpartition(".")[2] in internal and not n.startswith(contract)] == []


@pytest.mark.browser
def test_the_configuration_table_breaks_no_name_mid_word(tmp_path: Path) -> None:
    # Imported here: without Playwright this test is skipped, the rest of this file still runs.
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

    result = subprocess.run(
        [str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            for width in (1280, 760):
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.goto((tmp_path / "configuration" / "index.html").as_uri())
                header = page.locator("table").first.locator("th").all_inner_texts()
                assert header == ["Environment variable", "Keyword", "Type", "Default", "Description"]
                # An inline element that wraps has one client rectangle per line.
                broken = page.evaluate(
                    """[...document.querySelectorAll("td:nth-child(-n+2) code")]
                        .filter((c) => c.getClientRects().length > 1).map((c) => c.textContent)"""
                )
                assert broken == [], width
                page.close()
        finally:
            browser.close()


def test_router_hooks_example_resolves_the_user_once_for_every_hook() -> None:
    from docs.examples import router_hooks

    alice = {"Authorization": "Bearer alice"}
    app = router_hooks.app
    with serve(app) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/subscribe").status_code == 401
        assert http.get("/subscribe", params={"channel": "team:blue"}, headers=alice).status_code == 403
        with open_stream(f"{server.url}/subscribe", params={"channel": "team:red"}, headers=alice) as stream:
            assert json.loads(stream.next_event().data) == {"name": "alice", "teams": ["red"]}
            sent = http.post("/teams/red/messages", params={"text": "hi"}, headers=alice)
            assert sent.json() == {"status": "sent"}
            assert json.loads(stream.next_event().data) == {"from": "alice", "text": "hi"}
        app.dependency_overrides[router_hooks.current_user] = lambda: router_hooks.User(name="tester", teams=["red"])
        try:
            with open_stream(f"{server.url}/subscribe", params={"channel": "team:red"}) as stream:
                assert json.loads(stream.next_event().data) == {"name": "tester", "teams": ["red"]}
        finally:
            app.dependency_overrides.clear()
