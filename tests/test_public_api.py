"""The package's public names: ``__all__`` is sorted and complete."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import fastapi_sse

# Modules whose public names are their own business (optional extras, internals).
OWN_NAMESPACE = {"fastapi_sse.metrics", "fastapi_sse.backends.redis"}
# Public-looking names of public modules that are implementation details (modules
# named with a leading underscore are internal whole, and not listed).
INTERNAL = {
    "fastapi_sse.client": {"Frame", "Outlet"},
    "fastapi_sse.response": {"StreamHost"},
    "fastapi_sse.router": {"Authorize", "DefaultChannels", "Identify", "MaybeAwaitable", "OnConnect", "T"},
    "fastapi_sse.service": {"EventSpec", "logger"},
    "fastapi_sse.settings": {"BackendName", "ENV_PREFIX", "IdentityLimitPolicy", "OverflowPolicy"},
    "fastapi_sse.stats": {"LATENCY_BUCKETS"},
    "fastapi_sse.dependencies": {"STATE_KEY"},
    "fastapi_sse.middleware": {"SCOPE_KEY", "Slot", "claim"},
    # Public, imported as fastapi_sse.serving: a way to run the server, not the API.
    "fastapi_sse.serving": {"listening_socket", "serve"},
    # Public, but imported as fastapi_sse.testing: it needs the `testing` extra.
    "fastapi_sse.testing": {"EventReader", "LiveServer", "live_server", "open_event_stream", "running_server"},
    "fastapi_sse.wire": {
        "PING",
        "RESERVED_EVENT_NAMES",
        "check_event_id",
        "check_event_name",
        "check_last_event_id",
        "cursor_frame",
        "encode_data",
        "frame",
        "frame_payload",
        "retry_frame",
    },
}


def package_modules() -> list[ModuleType]:
    modules = []
    for info in pkgutil.walk_packages(fastapi_sse.__path__, "fastapi_sse."):
        if info.name in OWN_NAMESPACE or info.ispkg or info.name.rpartition(".")[2].startswith("_"):
            continue
        modules.append(importlib.import_module(info.name))
    return modules


def defined_public_names(module: ModuleType) -> set[str]:
    """Names a module defines itself (not imports) that do not start with an underscore."""
    names = set()
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if isinstance(value, type) or callable(value):
            if getattr(value, "__module__", None) == module.__name__:
                names.add(name)
        elif name.isupper() and isinstance(value, str | int | float | bytes | frozenset | tuple):
            names.add(name)
    return names - {"annotations", "TYPE_CHECKING"}


def isort_style(name: str) -> tuple[int, str]:
    """Ruff's ``__all__`` order (RUF022): CONSTANTS, then Classes, then functions."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_all_is_sorted_and_unique() -> None:
    assert fastapi_sse.__all__ == sorted(fastapi_sse.__all__, key=isort_style)
    assert len(set(fastapi_sse.__all__)) == len(fastapi_sse.__all__)


def test_all_names_exist() -> None:
    for name in fastapi_sse.__all__:
        assert hasattr(fastapi_sse, name), name


def test_every_public_name_is_exported() -> None:
    exported = set(fastapi_sse.__all__)
    missing = {}
    for module in package_modules():
        # A module's own __all__ is its public surface; otherwise its public-looking names.
        public = set(getattr(module, "__all__", defined_public_names(module)))
        lost = public - exported - INTERNAL.get(module.__name__, set())
        if lost:
            missing[module.__name__] = sorted(lost)
    assert not missing, f"public names not in fastapi_sse.__all__: {missing}"


def test_exported_objects_are_the_modules_own() -> None:
    from fastapi_sse.service import SSEService
    from fastapi_sse.wire import Text

    assert fastapi_sse.SSEService is SSEService
    assert fastapi_sse.Text is Text


def test_public_classes_and_functions_have_docstrings() -> None:
    for name in fastapi_sse.__all__:
        value = getattr(fastapi_sse, name)
        if callable(value) and not isinstance(value, str):
            assert getattr(value, "__doc__", None), f"{name} has no docstring"
