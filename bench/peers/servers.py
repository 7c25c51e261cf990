"""How the runner starts each app: the server's command line, its environment, and the
scenarios the app takes part in.

An app's target in ``bench.run.APPS`` is ``module:attr`` for an ASGI app on uvicorn, or
``<server>:<target>`` for another server: ``granian:`` and ``hypercorn:`` (an ASGI app,
one worker, uvloop), ``aiohttp:`` (a module run as ``python -m``) and ``node:`` (a
script under ``bench/peers/node``, whose ``node_modules`` come from ``npm ci``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

NODE_DIR = Path(__file__).resolve().parent / "node"

ENV: dict[str, dict[str, str]] = {
    "ours-middleware": {"BENCH_SSE_MIDDLEWARE": "1"},
}
"""Variables an app needs beyond those every app gets."""

PEER_SCENARIOS = {"fanout", "paced", "users", "single", "idle"}
SCENARIOS: dict[str, set[str]] = {
    "better-sse": PEER_SCENARIOS,
    "aiohttp-sse": PEER_SCENARIOS,
    "floor": PEER_SCENARIOS,
    "uvicorn-idle": {"idle"},
    "ours-granian": {"fanout", "paced", "idle", "users"},
    "ours-hypercorn": {"fanout", "paced", "idle", "users"},
}
"""The scenarios of apps that do not take part in all (the floors hold no buffers and send
no heartbeats; the peers are compared on fan-out, the per-user pattern and memory)."""


CORE = {"ours", "straightforward", "builtin"}
"""The apps the smoke run measures in every scenario; the others, only in ``SMOKE``."""

SMOKE = {"paced", "users", "idle"}
"""Enough to keep every route of the peers working, in seconds."""


def applies(app: str, scenario: str, *, smoke: bool = False) -> bool:
    if smoke and app not in CORE and scenario not in SMOKE:
        return False
    return scenario in SCENARIOS.get(app, {scenario})


def kind(target: str) -> str:
    head, _, rest = target.partition(":")
    return head if head in ("granian", "hypercorn", "aiohttp", "node") and rest else "uvicorn"


def command(target: str, port: int, workers: int = 1) -> list[str]:
    """The command that serves ``target`` on 127.0.0.1:``port`` (``workers``: uvicorn's)."""
    server, rest = kind(target), target.partition(":")[2]
    python = [sys.executable, "-m"]
    if server == "uvicorn":
        options = f"--host 127.0.0.1 --port {port} --loop uvloop --http httptools --backlog 8192 --workers {workers}"
        return [*python, "uvicorn", target, *options.split(), "--log-level", "warning"]
    if server == "granian":
        options = f"--interface asgi --host 127.0.0.1 --port {port} --loop uvloop --http 1 --no-ws --workers 1"
        # Granian serves at most --backpressure requests at once (default: the backlog, 8192).
        limits = ["--backlog", "8192", "--backpressure", "100000", "--log-level", "warning"]
        return [*python, "granian", *options.split(), *limits, rest]
    if server == "hypercorn":
        options = f"--bind 127.0.0.1:{port} --worker-class uvloop --workers 1 --backlog 8192"
        return [*python, "hypercorn", *options.split(), "--log-level", "warning", rest]
    if server == "aiohttp":
        return [sys.executable, "-m", rest, str(port)]
    return ["node", "--expose-gc", str(NODE_DIR / rest), str(port)]


def missing(target: str) -> str | None:
    """Why ``target`` cannot be served here, or None. For Node, installs the locked
    ``node_modules`` with ``npm ci`` when they are missing."""
    server = kind(target)
    if server in ("granian", "hypercorn", "aiohttp"):
        module = {"aiohttp": "aiohttp_sse"}.get(server, server)
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install {module.replace('_', '-')})"
        return None
    if server != "node":
        return None
    if shutil.which("node") is None:
        return "node is not on PATH (install Node 20, then the runner runs npm ci in bench/peers/node)"
    if not (NODE_DIR / "node_modules" / "better-sse").is_dir():
        if shutil.which("npm") is None:
            return "node_modules are missing and npm is not on PATH (run npm ci in bench/peers/node)"
        print(f"  installing better-sse: npm ci in {NODE_DIR}", flush=True)
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True)
        if done.returncode:
            return f"npm ci failed in {NODE_DIR}: {done.stderr.strip()[-500:]}"
    return None


def versions() -> dict[str, str]:
    """The versions of the peers' servers and libraries found here."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    for name in ("aiohttp", "aiohttp-sse", "granian", "hypercorn"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    if shutil.which("node"):
        found["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    package = NODE_DIR / "node_modules" / "better-sse" / "package.json"
    if package.is_file():
        found["better-sse"] = json.loads(package.read_text())["version"]
    return found
