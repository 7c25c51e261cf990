"""Servers on loopback ports: an app served by uvicorn in a thread of this process
(built on :func:`fastapi_sse.testing.running_server`) or in a process of its own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi_sse.testing import LiveServer, running_server

from .paths import ROOT

# An app served in a thread: url, port, app, loop and call(fn, *args) on its loop.
Served = LiveServer


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


@contextmanager
def serve(app: Any, **config: Any) -> Iterator[Served]:
    """Serve ``app`` with a real uvicorn server on a free loopback port, its lifespan on.

    On exit the app's streams are ended first through its service's ``shutdown()``,
    which has run by the time uvicorn is told to stop."""
    config.setdefault("lifespan", "on")
    with running_server(app, start_timeout=15.0, **config) as served:
        yield served


@contextmanager
def serve_process(
    target: str, env: dict[str, str] | None = None, *args: str, port: int | None = None, server: str = "uvicorn"
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``uvicorn target`` (or ``server``: ``hypercorn``) in its own process on
    ``port`` (a free one by default); yields (url, process). Extra ``args`` go to the
    server's command line."""
    port = port or free_port()
    full_env = {**os.environ, **(env or {})}
    if server == "hypercorn":
        command = ["hypercorn", "--bind", f"127.0.0.1:{port}", "--log-level", "warning", *args, target]
    else:
        command = ["uvicorn", target, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *args]
    proc = subprocess.Popen(
        [sys.executable, "-m", *command],
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
