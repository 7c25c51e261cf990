"""Mistakes caught when settings are built or the service starts: unknown keywords are
refused, unknown ``SSE_*`` variables warned about, a missing ``redis`` extra named, and
several workers on the in-memory backend warned about, under a real uvicorn."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers.paths import ROOT
from helpers.redis import RedisServer
from helpers.servers import free_port

from fastapi_sse import SettingsError, SSESettings, load_settings
from fastapi_sse.startup_checks import unknown_variables, worker_processes

MEMORY_WARNING = "worker processes share nothing through the in-memory backend"
STARTED = "Application startup complete."


class ServerOutput:
    """The lines a server process writes, read in a thread so that a test can wait for
    one with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                self._queue.put(line.rstrip("\n"))
            self._queue.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, done: Callable[[list[str]], bool], timeout: float = 30.0) -> list[str]:
        end = time.monotonic() + timeout
        while not done(self.lines):
            try:
                line = self._queue.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"timed out; the server wrote: {self.lines}") from None
            if line is None:
                raise AssertionError(f"the server exited; it wrote: {self.lines}")
            self.lines.append(line)
        return self.lines


@contextmanager
def uvicorn_process(env: dict[str, str], *args: str) -> Iterator[ServerOutput]:
    """``uvicorn tests.helpers.process_app:app`` with ``args``, its output merged and read line by line."""
    command = ["uvicorn", "tests.helpers.process_app:app", "--host", "127.0.0.1", "--port", str(free_port()), *args]
    with server_process(command, env) as output:
        yield output


@contextmanager
def server_process(command: list[str], env: dict[str, str]) -> Iterator[ServerOutput]:
    """``python -m <command>`` in the repository, its output merged and read line by line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        env={k: v for k, v in {**os.environ, **env}.items() if k != "WEB_CONCURRENCY"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield ServerOutput(proc)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def started(count: int) -> Callable[[list[str]], bool]:
    return lambda lines: sum(STARTED in line for line in lines) >= count


def test_an_unknown_keyword_names_the_closest_setting() -> None:
    with pytest.raises(SettingsError, match="'heartbeat_intreval': did you mean 'heartbeat_interval'"):
        SSESettings(heartbeat_intreval=1)  # type: ignore[call-arg]
    with pytest.raises(SettingsError, match="'retry_intervall': did you mean 'retry_interval'"):
        load_settings(retry_intervall=1)


def test_an_unknown_keyword_far_from_every_setting_lists_them() -> None:
    with pytest.raises(SettingsError, match=r"no setting 'colour'.*heartbeat_interval, retry_interval"):
        SSESettings(colour="blue")  # type: ignore[call-arg]


def test_unknown_variables_and_env_file_lines_are_ignored_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # extra="forbid" would refuse these too, and stop the app over a stray variable.
    monkeypatch.setenv("SSE_HEARTBEAT_INTREVAL", "1")
    env_file = tmp_path / ".env"
    env_file.write_text("SSE_RETRY_INTERVALL=1\nSSE_RETRY_INTERVAL=2\n")
    settings = load_settings(_env_file=env_file)
    assert (settings.heartbeat_interval, settings.retry_interval) == (30.0, 2.0)


def test_unknown_variables_are_found_with_the_closest_setting() -> None:
    environ = {
        "SSE_HEARTBEAT_INTREVAL": "1",
        "sse_retry_interval": "2",  # read without regard to case: a setting
        "SSE_COLOUR": "blue",
        "PATH": "/bin",
    }
    assert unknown_variables(environ) == [
        ("SSE_COLOUR", None),
        ("SSE_HEARTBEAT_INTREVAL", "SSE_HEARTBEAT_INTERVAL"),
    ]


def test_the_redis_backend_without_redis_py_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # What an install without the extra looks like to an import.
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    monkeypatch.setenv("SSE_BACKEND", "redis")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "SSE_BACKEND" in str(info.value)
    assert "pip install 'fastapi-sse-channels[redis]'" in str(info.value)
    assert SSESettings(backend="memory").backend == "memory"


@pytest.mark.parametrize(
    ("environ", "parent", "own", "workers"),
    [
        ({}, ["/usr/bin/bash"], ["/venv/bin/uvicorn", "app:app"], 1),
        ({}, ["/venv/bin/python", "-m", "uvicorn", "app:app", "--workers", "4"], [], 4),
        ({}, ["/venv/bin/uvicorn", "app:app", "--workers=3"], [], 3),
        ({}, ["bash"], ["/venv/lib/uvicorn/__main__.py", "app:app", "--workers", "2"], 2),
        ({"WEB_CONCURRENCY": "4"}, ["bash"], ["/venv/bin/uvicorn", "app:app", "--workers", "1"], 1),
        ({"WEB_CONCURRENCY": "4"}, ["bash"], ["/venv/bin/python", "app.py"], 4),
        ({"UVICORN_WORKERS": "3"}, ["/venv/bin/uvicorn", "app:app"], [], 3),
        ({}, ["/venv/bin/python", "/venv/bin/gunicorn", "-w", "5", "-k", "uvicorn.workers.UvicornWorker"], [], 5),
        ({}, ["gunicorn", "-w8", "app:app"], [], 8),
        ({"GUNICORN_CMD_ARGS": "--bind 0.0.0.0 --workers 6"}, ["gunicorn", "app:app"], [], 6),
        ({"WEB_CONCURRENCY": "not a number"}, [], [], 1),
    ],
)
def test_worker_processes_from_command_lines_and_environment(
    environ: dict[str, str], parent: list[str], own: list[str], workers: int
) -> None:
    assert worker_processes(environ, parent, own) == workers


def test_uvicorn_with_two_workers_on_the_memory_backend_warns_in_each_worker() -> None:
    with uvicorn_process({}, "--workers", "2", "--log-level", "info") as output:
        lines = output.wait_for(started(2))
    warnings = [line for line in lines if MEMORY_WARNING in line]
    assert len(warnings) == 2, lines  # once per worker
    assert "2 worker processes" in warnings[0]
    assert "SSE_BACKEND=redis" in warnings[0]


def test_one_worker_or_the_redis_backend_brings_no_worker_warning(redis_server: RedisServer) -> None:
    with uvicorn_process({}, "--log-level", "info") as output:
        lines = output.wait_for(started(1))
    redis_env = {"SSE_BACKEND": "redis", "SSE_REDIS_URL": redis_server.url, "SSE_REDIS_KEY_PREFIX": "startup-checks:"}
    with uvicorn_process(redis_env, "--workers", "2", "--log-level", "info") as output:
        lines += output.wait_for(started(2))
    assert [line for line in lines if MEMORY_WARNING in line] == []


def test_an_unknown_variable_is_warned_about_once_at_startup() -> None:
    env = {"SSE_HEARTBEAT_INTREVAL": "5"}
    with uvicorn_process(env, "--log-level", "info") as output:
        lines = output.wait_for(started(1))
    expected = "SSE_HEARTBEAT_INTREVAL matches no SSE setting and is ignored: did you mean SSE_HEARTBEAT_INTERVAL?"
    assert [line for line in lines if "SSE_HEARTBEAT_INTREVAL" in line] == [expected]


def test_gunicorn_with_workers_set_in_its_configuration_file_warns(tmp_path: Path) -> None:
    # Installed by the dev extra; the count is in no command line nor variable here.
    pytest.importorskip("gunicorn")
    pytest.importorskip("uvicorn_worker")
    config = tmp_path / "gunicorn.conf.py"
    config.write_text("workers = 2\nworker_class = 'uvicorn_worker.UvicornWorker'\n")
    command = ["gunicorn", "-c", str(config), "-b", f"127.0.0.1:{free_port()}", "tests.helpers.process_app:app"]
    with server_process(command, {}) as output:
        lines = output.wait_for(started(2))
    warnings = [line for line in lines if MEMORY_WARNING in line]
    assert len(warnings) == 2, lines
    assert "2 worker processes" in warnings[0]
