"""The documentation stays true: its code is tested files, its settings table is
generated from SSESettings, the README's snippet runs, and the site builds strictly."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from conftest import ROOT, serve
from helpers.apps import router_app
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


def test_open_event_stream_reports_a_refused_stream() -> None:
    with (
        live_server(minimal.app) as url,
        pytest.raises(httpx.HTTPStatusError),
        open_event_stream(url + "/subscribe", params={"channel": "bad name"}),
    ):
        pass


def test_readme_starts_with_make_run_and_make_test() -> None:
    first, second = (ROOT / "README.md").read_text().splitlines()[:2]
    assert first.split()[:2] == ["make", "run"]
    assert second.split()[:2] == ["make", "test"]


def test_readme_usage_is_the_tested_minimal_example() -> None:
    assert (EXAMPLES / "minimal.py").read_text() in (ROOT / "README.md").read_text()


def test_readme_leaves_a_spot_for_the_screenshot() -> None:
    assert "(docs/img/example-page.png)" in (ROOT / "README.md").read_text()


def test_settings_table_has_every_field_with_its_env_var_and_description() -> None:
    table = load_hook().settings_table()
    rows = {line.split("|")[1].strip(" `"): line for line in table.splitlines()[2:]}
    assert len(rows) == len(SSESettings.model_fields)
    for name, field in SSESettings.model_fields.items():
        row = rows[f"SSE_{name.upper()}"]
        assert (field.description or "").replace("|", "\\|") in row, name
        assert str(field.get_default()) in row, name


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
    tests = (ROOT / "tests" / "test_seed_examples.py").read_text() + Path(__file__).read_text()
    modules = {p.stem for p in EXAMPLES.glob("*.py")} - {"auth"}
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
