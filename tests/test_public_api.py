"""The package's public names: ``__all__`` is sorted and complete."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import fastapi_sse

# Modules whose public names are their own business: optional extras, and helpers
# imported by their module's name (a way to run the server, the testing helpers).
OWN_NAMESPACE = {
    "fastapi_sse.metrics",
    "fastapi_sse.backends.redis",
    "fastapi_sse.backends.redis_cluster",
    "fastapi_sse.serving",
    "fastapi_sse.testing",
}
# Modules named with a leading underscore are internal whole; every other module
# declares its public names in __all__, and each of them is exported.


def package_modules() -> list[ModuleType]:
    modules = []
    for info in pkgutil.walk_packages(fastapi_sse.__path__, "fastapi_sse."):
        if info.name in OWN_NAMESPACE or info.ispkg or info.name.rpartition(".")[2].startswith("_"):
            continue
        modules.append(importlib.import_module(info.name))
    return modules


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
        # A module's own __all__ is its public surface, and names all it defines.
        assert hasattr(module, "__all__"), f"{module.__name__} has no __all__"
        public = set(module.__all__)
        lost = public - exported
        if lost:
            missing[module.__name__] = sorted(lost)
    assert not missing, f"public names not in fastapi_sse.__all__: {missing}"


def test_exported_objects_are_the_modules_own() -> None:
    from fastapi_sse._wire import Text
    from fastapi_sse.service import SSEService

    assert fastapi_sse.SSEService is SSEService
    assert fastapi_sse.Text is Text


def test_public_classes_and_functions_have_docstrings() -> None:
    for name in fastapi_sse.__all__:
        value = getattr(fastapi_sse, name)
        if callable(value) and not isinstance(value, str):
            assert getattr(value, "__doc__", None), f"{name} has no docstring"
