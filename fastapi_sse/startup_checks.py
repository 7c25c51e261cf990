"""Mistakes worth a warning when the service starts: ``SSE_*`` variables that match no
setting, and several worker processes on the in-memory backend.

Each warning is logged once per process, on the ``fastapi_sse`` logger.
"""

from __future__ import annotations

import difflib
import gc
import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from fastapi_sse.backends import MemoryBackend
from fastapi_sse.settings import ENV_PREFIX, SSESettings

if TYPE_CHECKING:
    from fastapi_sse.service import SSEService

logger = logging.getLogger("fastapi_sse")
_warned: set[str] = set()

_NESTED_DELIMITER = "__"
SERVERS = frozenset({"uvicorn", "gunicorn"})


def check_startup(service: SSEService, *, from_environment: bool) -> None:
    """Warn about what would silently misbehave. ``from_environment``: the settings were
    read from ``SSE_*`` variables (not given in code), so the variables are checked."""
    if from_environment:
        for name, closest in unknown_variables(os.environ):
            hint = f": did you mean {closest}?" if closest else ""
            _warn_once(f"{name} matches no SSE setting and is ignored{hint}")
    if isinstance(service.backend, MemoryBackend):
        workers = _gunicorn_workers() or worker_processes(os.environ, _parent_argv(), sys.argv)
        if workers > 1:
            _warn_once(
                f"{workers} worker processes share nothing through the in-memory backend: an event "
                "published in one worker never reaches clients of the others, and a browser that "
                "reconnects to another worker finds no history. Set SSE_BACKEND=redis "
                "(pip install 'fastapi-sse-channels[redis]') or run one worker."
            )


def setting_variables(model: type[BaseModel] = SSESettings, prefix: str = ENV_PREFIX) -> list[str]:
    """Every environment variable a setting is read from (nested sections as
    ``SSE_SECTION`` and ``SSE_SECTION__FIELD``)."""
    names = []
    for name, field in model.model_fields.items():
        env = f"{prefix}{name.upper()}"
        names.append(env)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names += setting_variables(field.annotation, env + _NESTED_DELIMITER)
    return names


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``SSE_*`` variables that no setting reads, each with the closest setting's variable
    (or ``None``). Matched without regard to case, as the settings are read."""
    known = setting_variables()
    upper = set(known)
    out = []
    for name in sorted(environ):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in upper:
            closest = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
            out.append((name, closest[0] if closest else None))
    return out


def worker_processes(environ: Mapping[str, str], parent_argv: Sequence[str], own_argv: Sequence[str] = ()) -> int:
    """How many worker processes the server runs, as far as can be told: ``--workers`` /
    ``-w`` on the command line of the parent (uvicorn's supervisor, gunicorn's arbiter) or
    of this process, else ``UVICORN_WORKERS``, ``GUNICORN_CMD_ARGS`` or ``WEB_CONCURRENCY``
    (the servers' own defaults). 1 when nothing tells."""
    server = None
    for argv in (parent_argv, own_argv):
        server = _server_name(argv)
        if server is not None:
            from_argv = _workers_option(argv[1:], short=server == "gunicorn")
            if from_argv is not None:
                return from_argv
            break
    if server == "uvicorn" and _int(environ.get("UVICORN_WORKERS")) is not None:
        return _int(environ.get("UVICORN_WORKERS")) or 1
    if server == "gunicorn" or "GUNICORN_CMD_ARGS" in environ:
        from_cmd_args = _workers_option(shlex.split(environ.get("GUNICORN_CMD_ARGS", "")), short=True)
        if from_cmd_args is not None:
            return from_cmd_args
    return _int(environ.get("WEB_CONCURRENCY")) or 1


def _server_name(argv: Sequence[str]) -> str | None:
    """``uvicorn`` or ``gunicorn`` when ``argv`` runs one of them (``uvicorn ...``,
    ``python -m uvicorn ...``, or ``.../uvicorn/__main__.py`` as ``sys.argv`` shows it)."""
    for arg in argv[:3]:
        path = Path(arg)
        name = path.parent.name if path.name == "__main__.py" else path.name
        if name in SERVERS:
            return name
    return None


def _workers_option(args: Sequence[str], *, short: bool) -> int | None:
    value: str | None = None
    for i, arg in enumerate(args):
        if arg == "--workers" or (short and arg == "-w"):
            value = args[i + 1] if i + 1 < len(args) else None
        elif arg.startswith("--workers="):
            value = arg.partition("=")[2]
        elif short and arg.startswith("-w") and arg[2:].isdigit():
            value = arg[2:]
    return _int(value)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _gunicorn_workers() -> int | None:
    """Under gunicorn, the arbiter's worker count, whatever set it (command line,
    configuration file, environment). gunicorn's arbiter sets ``SERVER_SOFTWARE``,
    and a worker is a fork of the arbiter: it holds a copy of the arbiter object."""
    arbiter = sys.modules.get("gunicorn.arbiter")
    if arbiter is None or not os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/"):
        return None
    for obj in gc.get_objects():
        if isinstance(obj, arbiter.Arbiter):
            workers = getattr(obj, "num_workers", None)
            return workers if isinstance(workers, int) else None
    return None


def _parent_argv() -> list[str]:
    """The parent process's command line (Linux ``/proc``); empty where it cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


# Nothing here is public API: the lifespan runs the checks.
__all__: list[str] = []
