"""The package's shape: no import cycle among grad2's modules (lazy imports inside
functions included), no module over 500 lines in the core and the serving part, and the
``defense:`` keys table of docs/configuration.md generated from the classes' declarations."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from grad2.defenses import keys_table

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "grad2"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The grad2 modules ``path`` imports anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
    return {name for name in found if name in known}


def test_no_import_cycle() -> None:
    known = modules()
    # A module may import itself by name (``python -m`` entry points do): not a cycle.
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for neighbour in sorted(graph[name]):
            if state.get(neighbour) == "open":
                path = [*trail, name]
                cycle = [*path[path.index(neighbour):], neighbour]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if neighbour not in state:
                visit(neighbour, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_core_and_serving_modules_stay_small() -> None:
    long = {
        name: lines for name, path in modules().items()
        if not name.startswith(("grad2.lab", "grad2.tools"))
        and (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_docs_show_the_declared_keys() -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert keys_table() in docs, (
        "docs/configuration.md's defense: keys table is stale; regenerate it with "
        "python -c 'from grad2.defenses import keys_table; print(keys_table())'")
