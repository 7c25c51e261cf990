"""Every example in the docs runs on its own: each file is copied alone into an empty
folder and served there by a real uvicorn process that can import the library and
nothing of this repository; a real SSE client opens its stream, something publishes,
and the event arrives."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.paths import ROOT
from helpers.redis import RedisServer
from helpers.servers import free_port, wait_for_port
from helpers.streams import Stream, open_stream

EXAMPLES = ROOT / "docs" / "examples"
ALICE = {"X-User-Id": "alice"}
ADMIN = {"Authorization": "Bearer admin-secret"}

# Added beside an example that has no publishing route of its own: publishes through
# the example's running service, as any code of the app would.
PUBLISHER = """\
from {module} import app

from fastapi_sse import get_sse_from_app


@app.post("/test-publish")
async def test_publish(channel: str, event: str) -> None:
    get_sse_from_app(app).broadcast(channel, event, {{"published": True}})
"""

# publishing.py is a function to call from an app: this app calls it.
PUBLISHING_APP = """\
from fastapi import FastAPI

from fastapi_sse import SSEDep, allow_all, create_sse_router
from publishing import publish_everywhere

app = FastAPI()
app.include_router(create_sse_router(authorize=allow_all))


@app.post("/test-publish")
async def test_publish(sse: SSEDep) -> str:
    (client,) = sse.get_clients()
    return await publish_everywhere(sse, client, {"id": 1})
"""


def publish(channel: str, event: str) -> Callable[[httpx.Client, str], Any]:
    return lambda http, url: http.post(f"{url}/test-publish", params={"channel": channel, "event": event})


def post(path: str, **kwargs: Any) -> Callable[[httpx.Client, str], Any]:
    return lambda http, url: http.post(url + path, **kwargs)


@dataclass
class Example:
    """How to use one example: the stream to open, how to make it publish, what arrives."""

    stream: str
    trigger: Callable[[httpx.Client, str], Any]
    events: list[str]
    headers: dict[str, str] = field(default_factory=dict)
    publisher: bool = False  # serve it with PUBLISHER beside it
    companions: tuple[str, ...] = ()  # files the page shows with it
    env: dict[str, str] = field(default_factory=dict)
    check: Callable[[httpx.Client, str, list[Any]], None] | None = None
    private: tuple[str, ...] = ()  # events sent to one client (send_to): never replayed
    # For a run: the trigger starts it, and its answer names the stream to follow.
    follow: Callable[[Any], str] | None = None


def stats_count_the_stream(http: httpx.Client, url: str, events: list[Any]) -> None:
    assert http.get(f"{url}/admin/summary", headers=ADMIN).json()["totalConnections"] == 1


def metrics_show_the_stream(http: httpx.Client, url: str, events: list[Any]) -> None:
    assert http.get(f"{url}/sse/metrics").status_code == 401
    metrics = http.get(f"{url}/sse/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert "fastapi_sse_connections{" in metrics.text


def progress_is_a_run_to_its_end(http: httpx.Client, url: str, events: list[Any]) -> None:
    task_id = json.loads(events[0].data)["taskId"]
    assert [json.loads(e.data)["current"] for e in events[:-1]] == [1, 2]
    assert json.loads(events[-1].data) == {"status": "done", "result": {"processed": 2}}
    # Seen to its end: a browser's EventSource that reconnects is told to stop.
    again = http.get(f"{url}/runs/{task_id}", headers={**ALICE, "Last-Event-ID": events[-1].id})
    assert again.status_code == 204


def llm_answer_is_whole_and_the_own_route_agrees(http: httpx.Client, url: str, events: list[Any]) -> None:
    answer = "".join(json.loads(e.data)["text"] for e in events[:-1])
    assert answer == "You said: what is a run? "
    assert json.loads(events[-1].data) == {"status": "done", "result": {"text": answer}}
    run_id = http.post(f"{url}/chat", json={"prompt": "again"}).json()["run_id"]
    with open_stream(f"{url}/chat/{run_id}/events", opened=False) as own:
        rest = own.rest()
    assert [e.event for e in rest] == ["token"] * 3 + ["end"]


def message_format_is_exact(http: httpx.Client, url: str, events: list[Any]) -> None:
    assert (events[0].id, json.loads(events[0].data)) == ("msg-123", {"message": "Hello"})


EXAMPLE_RUNS: dict[str, Example] = {
    "minimal.py": Example("/subscribe?channel=order:17", post("/orders/17/ship"), ["orderShipped"]),
    "quick_start.py": Example("/events", post("/users/alice/notify"), ["notification"], headers=ALICE),
    "basic_endpoint.py": Example(
        "/subscribe", publish("user:alice", "notification"), ["notification"], headers=ALICE, publisher=True
    ),
    "best_practices.py": Example(
        "/orders/o1/live", publish("order:o1", "orderShipped"), ["orderShipped"], headers=ALICE, publisher=True
    ),
    "broadcasting.py": Example(
        "/events",
        post("/messages", json={"recipient_id": "alice", "content": "hi"}, headers={"X-User-Id": "bob"}),
        ["newMessage"],
        headers=ALICE,
    ),
    "channels.py": Example(
        "/subscribe?channel=orders", publish("orders", "newOrder"), ["newOrder"], headers=ALICE, publisher=True
    ),
    "client_side.py": Example(
        "/subscribe",
        post("/users/alice/notify", params={"message": "Hi"}),
        ["notification"],
        headers={"Cookie": "user_id=alice"},
        companions=("client.html",),
    ),
    "collaboration.py": Example(
        "/document/roadmap/live",
        post("/document/roadmap/edit", json={"changes": ["+1"]}, headers={"X-User-Id": "bob"}),
        ["userJoined", "documentChanged"],
        headers=ALICE,
    ),
    "configuration.py": Example("/subscribe?channel=news", publish("news", "headline"), ["headline"], publisher=True),
    "connection_stats.py": Example(
        "/subscribe?channel=a", publish("a", "ping"), ["ping"], publisher=True, check=stats_count_the_stream
    ),
    "dashboard.py": Example(
        "/dashboard/live", post("/orders", json={"total": 9.5, "customer_name": "Ada"}), ["initialData", "newOrder"]
    ),
    "disconnect.py": Example("/subscribe?channel=a", publish("a", "ping"), ["ping"], publisher=True),
    "llm_runs.py": Example(
        "/runs/{run_id}",
        post("/chat", json={"prompt": "what is a run?"}),
        ["token"] * 6 + ["end"],
        follow=lambda started: f"/runs/{started['run_id']}",
        check=llm_answer_is_whole_and_the_own_route_agrees,
    ),
    "message_format.py": Example(
        "/hello", lambda http, url: None, ["notification"], check=message_format_is_exact, private=("notification",)
    ),
    "notifications.py": Example(
        "/subscribe",
        post("/notifications", json={"title": "T", "body": "B"}, headers=ALICE),
        ["notification"],
        headers=ALICE,
    ),
    "progress.py": Example(
        "/runs/{taskId}",
        post("/process", json={"data": ["a", "b"]}, headers=ALICE),
        ["taskProgress", "taskProgress", "end"],
        headers=ALICE,
        follow=lambda started: f"/runs/{started['taskId']}",
        check=progress_is_a_run_to_its_end,
    ),
    "router_hooks.py": Example(
        "/subscribe?channel=team:red",
        post("/teams/red/messages", params={"text": "hi"}, headers={"Authorization": "Bearer alice"}),
        ["hello", "message"],
        headers={"Authorization": "Bearer alice"},
    ),
    "typed_events.py": Example("/events", post("/notify", headers=ALICE), ["notification"], headers=ALICE),
    "publishing.py": Example(
        "/subscribe?channel=orders",
        post("/test-publish"),
        ["announcement", "initialState", "newOrder"],
        private=("initialState",),
    ),
}


def inline_app_blocks() -> dict[str, str]:
    """Whole apps written inline in a page (not included from docs/examples/), by page."""
    blocks = {}
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
            if re.search(r"^app = FastAPI\(", block, re.M):
                blocks[f"{page.relative_to(ROOT / 'docs').with_suffix('').as_posix()}-{i}"] = block
    return blocks


INLINE_RUNS: dict[str, Example] = {
    "metrics-0": Example(
        "/sse/subscribe?channel=a",
        publish("a", "ping"),
        ["ping"],
        publisher=True,
        env={"METRICS_TOKEN": "scrape-me"},
        check=metrics_show_the_stream,
    ),
}


@pytest.fixture(scope="module")
def library_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the package: on PYTHONPATH, it makes the library of this
    checkout importable, and nothing else of the repository."""
    path = tmp_path_factory.mktemp("library")
    (path / "fastapi_sse").symlink_to(ROOT / "fastapi_sse")
    return path


@contextmanager
def served_from(folder: Path, target: str, library: Path, env: dict[str, str], *args: str) -> Iterator[str]:
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_")}
    full_env.update({"PYTHONPATH": str(library), **env})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            target,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            *args,
        ],
        cwd=folder,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        try:
            wait_for_port(port, proc=proc)
        except RuntimeError:
            assert proc.stdout is not None
            raise AssertionError(proc.stdout.read().decode()) from None
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def run_example(folder: Path, module: str, example: Example, library: Path) -> None:
    target = f"{module}:app"
    if example.publisher:
        (folder / "served_example.py").write_text(PUBLISHER.format(module=module))
        target = "served_example:app"
    if module == "publishing":
        (folder / "publishing_app.py").write_text(PUBLISHING_APP)
        target = "publishing_app:app"
    with served_from(folder, target, library, example.env) as url, httpx.Client(timeout=10) as http:
        path = example.stream
        if example.follow is not None:
            # A run keeps its events: start it, then follow it from its start.
            started = example.trigger(http, url)
            assert started.status_code < 300, started.text
            path = example.follow(started.json())
        with open_stream(url + path, headers=example.headers, opened=False) as stream:
            if example.follow is None:
                response = example.trigger(http, url)
                if response is not None:
                    assert response.status_code < 300, response.text
            events = received(stream, len(example.events))
            assert [e.event for e in events] == example.events
            if example.follow is not None:
                assert stream.rest() == [], "a run's stream ends with its end event"
            if example.check is not None:
                example.check(http, url, events)
            resumes_exactly(url + path, example, events)


def resumes_exactly(url: str, example: Example, events: list[Any]) -> None:
    """Reconnect as EventSource does, with the first event's id: the stream replays
    exactly what came after it on its channels (or of its run), with no gap."""
    missed = [(e.event, e.id, e.data) for e in events[1:] if e.event not in example.private]
    headers = {**example.headers, "Last-Event-ID": events[0].id}
    with open_stream(url, headers=headers, opened=False) as again:
        assert again.next_frame().retry is not None
        replayed: list[tuple[str, str, str]] = []
        while len(replayed) < len(missed):
            frame = again.next_frame()
            assert frame.event != "gap", frame.data
            assert frame.data, f"the replay ended after {replayed}, {missed} missed"
            replayed.append((frame.event, frame.id, frame.data))
        assert replayed == missed
        if not missed:
            # Nothing was missed: the opening says where the stream stands (or brings what
            # the route sends each new stream), and no gap.
            frame = again.next_frame()
            assert frame.event != "gap", frame.data
            assert (frame.event, frame.data) == ("message", "") or frame.event in example.private, frame


def received(stream: Stream, count: int) -> list[Any]:
    return [stream.next_event() for _ in range(count)]


def test_every_example_file_has_a_standalone_run() -> None:
    clients = {"testing_your_app.py", "python_client.py"}  # not apps: run against one below
    assert {p.name for p in EXAMPLES.glob("*.py")} - clients == set(EXAMPLE_RUNS)
    assert set(inline_app_blocks()) == set(INLINE_RUNS)


def test_no_example_imports_from_the_repository() -> None:
    for path in EXAMPLES.glob("*.py"):
        assert not re.search(r"^\s*from (docs|tests|example_app)\b|^\s*from \.", path.read_text(), re.M), path.name


@pytest.mark.parametrize("name", sorted(EXAMPLE_RUNS))
def test_example_runs_alone_in_an_empty_folder(name: str, tmp_path: Path, library_only: Path) -> None:
    example = EXAMPLE_RUNS[name]
    for file in (name, *example.companions):
        shutil.copy(EXAMPLES / file, tmp_path / file)
    run_example(tmp_path, Path(name).stem, example, library_only)


@pytest.mark.parametrize("name", sorted(INLINE_RUNS))
def test_inline_app_runs_alone_in_an_empty_folder(name: str, tmp_path: Path, library_only: Path) -> None:
    (tmp_path / "page_app.py").write_text(inline_app_blocks()[name])
    run_example(tmp_path, "page_app", INLINE_RUNS[name], library_only)


def test_the_testing_example_passes_under_pytest_in_an_empty_folder(tmp_path: Path, library_only: Path) -> None:
    shutil.copy(EXAMPLES / "testing_your_app.py", tmp_path / "test_app.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_app.py"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(library_only)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_the_python_client_follows_a_stream_in_an_empty_folder(tmp_path: Path, library_only: Path) -> None:
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    shutil.copy(EXAMPLES / "minimal.py", server_dir / "minimal.py")
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    shutil.copy(EXAMPLES / "python_client.py", client_dir / "python_client.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_")}
    with (
        served_from(server_dir, "minimal:app", library_only, {}) as url,
        subprocess.Popen(
            [sys.executable, "python_client.py", f"{url}/subscribe", "order:17"],
            cwd=client_dir,
            env={**env, "PYTHONPATH": ""},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as client,
    ):
        assert client.stdout is not None and client.stderr is not None
        try:
            # Blocking reads: the client's own read timeout (60 s) bounds them.
            assert client.stderr.readline() == "connected to order:17\n"
            httpx.post(f"{url}/orders/17/ship", timeout=10).raise_for_status()
            assert client.stdout.readline() == "orderShipped {'orderId': '17'}\n"
        finally:
            client.kill()


def test_the_minimal_example_on_redis_with_several_workers(
    tmp_path: Path, library_only: Path, redis_server: RedisServer
) -> None:
    """The configuration page's `SSE_BACKEND=redis ... uvicorn app:app --workers N`:
    whichever worker takes each connection, every stream gets every event."""
    shutil.copy(EXAMPLES / "minimal.py", tmp_path / "minimal.py")
    env = {"SSE_BACKEND": "redis", "SSE_REDIS_URL": redis_server.url, "SSE_REDIS_KEY_PREFIX": f"{tmp_path.name}:"}
    with (
        served_from(tmp_path, "minimal:app", library_only, env, "--workers", "2") as url,
        open_stream(f"{url}/subscribe?channel=order:17") as first,
        open_stream(f"{url}/subscribe?channel=order:17") as second,
    ):
        for _ in range(4):  # new connections each time: the kernel spreads them over the workers
            with httpx.Client(timeout=10) as publisher:
                publisher.post(f"{url}/orders/17/ship").raise_for_status()
        assert [e.event for e in received(first, 4)] == ["orderShipped"] * 4
        assert [e.event for e in received(second, 4)] == ["orderShipped"] * 4
