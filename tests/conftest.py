"""Shared fixtures: real uvicorn servers on loopback ports and a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, deadline: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts connections on the port (a readiness probe, not a sleep)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {deadline}s")


@dataclass
class Served:
    """An app served by uvicorn in a background thread of this process."""

    app: Any
    port: int
    server: uvicorn.Server
    loop: asyncio.AbstractEventLoop

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, fn: Any, *args: Any, timeout: float = 10.0) -> Any:
        """Run ``fn(*args)`` on the server's event loop and return its result (await it if a coroutine)."""

        async def runner() -> Any:
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(runner(), self.loop).result(timeout)


async def _shutdown(sse: Any) -> None:
    sse.shutdown()


@contextmanager
def serve(app: Any, **config: Any) -> Iterator[Served]:
    """Serve ``app`` with a real uvicorn server on a free loopback port."""
    port = free_port()
    cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **config)
    server = uvicorn.Server(cfg)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    end = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > end:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    started.set()
    try:
        yield Served(app, port, server, loop)
    finally:
        # Streams are endless: end them first, as the service's signal handler does
        # under a real uvicorn process (signals cannot be installed off the main thread).
        sse = getattr(getattr(app, "state", None), "sse", None)
        if sse is not None and loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_shutdown(sse), loop).result(10)
        server.should_exit = True
        thread.join(15)
        loop.close()


@contextmanager
def serve_process(
    target: str, env: dict[str, str] | None = None, *args: str, port: int | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``uvicorn target`` in its own process on ``port`` (a free one by default);
    yields (url, process). Extra ``args`` go to uvicorn's command line."""
    port = port or free_port()
    full_env = {**os.environ, **(env or {})}
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
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]
    dir: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis(port: int | None = None, data_dir: str | None = None, *options: str) -> RedisServer:
    """Start a private redis-server; ``options`` are extra config arguments
    (``"--appendonly", "yes"`` to keep data across a restart, ``"--requirepass", "pw"``)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: run 'make install' (apt-get install redis-server)")
    port = port or free_port()
    data_dir = data_dir or tempfile.mkdtemp(prefix="sse-redis-")
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", data_dir]
    proc = subprocess.Popen(
        [*args, *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc=proc)
    return RedisServer(port, proc, data_dir)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the session, on its own port. Tests isolate by key prefix."""
    server = start_redis()
    try:
        yield server
    finally:
        server.proc.kill()
        server.proc.wait(10)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client
