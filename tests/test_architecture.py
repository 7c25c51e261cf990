"""The package's shape: short modules, no module touching another's private names,
no import cycles (not even for type checking), tests that use helpers, not conftest."""

from __future__ import annotations

import ast
from pathlib import Path

import fastapi_sse

PACKAGE = Path(fastapi_sse.__file__).parent
TESTS = Path(__file__).parent
MAX_LINES = 350
# The facade: the whole public API with its docstrings, each method a few lines
# (runs and presence are parts of their own, reached as sse.runs and sse.presence).
MAX_SERVICE_LINES = 390


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def own_private_names(tree: ast.AST) -> set[str]:
    """``_names`` a module defines: its functions, classes, globals and the attributes
    it sets on ``self``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def foreign_private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    own = own_private_names(tree)
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = node.attr
            if name.startswith("_") and not name.startswith("__") and name not in own:
                uses.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastapi_sse"):
            # An internal module may be imported; a private name of a module may not.
            names = [a.name for a in node.names if a.name.startswith("_")]
            uses.extend(f"{path.name}:{node.lineno}: {n}" for n in names if f"{node.module}.{n}" not in modules())
    return uses


def imports(path: Path, package: str) -> set[str]:
    """Modules of the package that ``path`` imports, at run time or for type checking."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(package))
    return found


def test_modules_are_short() -> None:
    lines = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert lines.pop("fastapi_sse.service") <= MAX_SERVICE_LINES
    assert {name: n for name, n in lines.items() if n > MAX_LINES} == {}


def test_no_module_touches_another_modules_private_names() -> None:
    uses = [use for path in modules().values() for use in foreign_private_uses(path)]
    assert uses == []


def test_no_import_cycles_even_for_type_checking() -> None:
    known = modules()
    graph = {
        name: {m for m in imports(path, "fastapi_sse") if m in known and m != name} for name, path in known.items()
    }
    # A package imports its modules to re-export them; its modules importing the
    # package's names is the cycle that counts.
    for package in ("fastapi_sse", "fastapi_sse.backends"):
        graph[package] = set()
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        for target in sorted(graph[name]):
            if target in path:
                cycles.append([*path[path.index(target) :], target])
            elif target not in done:
                visit(target, [*path, target])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert cycles == []


def test_lua_scripts_are_files_shipped_with_the_package() -> None:
    scripts = sorted(p.name for p in (PACKAGE / "backends" / "lua").glob("*.lua"))
    assert scripts
    assert "redis.call" not in (PACKAGE / "backends" / "redis.py").read_text()


def test_no_test_imports_conftest() -> None:
    for path in [*TESTS.rglob("*.py"), *(TESTS.parent / "bench").rglob("*.py")]:
        names = imports(path, "conftest") | imports(path, "tests.conftest")
        assert not names, f"{path} imports {names}"
