"""The shape of the ``outbox`` package, read from its source: no import circles, no private names
imported across modules, nothing upward, and no switch that kills the process.

Every import statement counts, the ones inside functions too: an import moved into a function
still makes its module depend on the other one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "outbox"


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (migrations left out)."""
    found = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        if "migrations" in path.parts:
            continue
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, imported name or None) of every absolute import statement in the file."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.module, alias.name) for alias in node.names]
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules whose code runs (or must have run) when it imports them.

    ``from a.b import c`` depends on ``a.b.c`` when that is a module, else on ``a.b`` (where ``c``
    is defined). Importing a module also runs its packages' ``__init__``, except those of the
    importer's own packages: Python ran them before the importer.
    """
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for module, imported in imports(path):
            if module != PACKAGE and not module.startswith(PACKAGE + "."):
                continue
            target = f"{module}.{imported}" if imported and f"{module}.{imported}" in known else module
            graph[name].add(target)
            graph[name].update(a for a in ancestors(target) if a not in ancestors(name))
        graph[name].discard(name)
        graph[name] &= set(known)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_outbox_package_has_no_import_circles():
    graph = import_graph()
    assert "outbox.relay.loop" in graph["outbox.relay"], "the graph must see the relay package"
    assert cycles(graph) == []


def test_the_cycle_finder_sees_a_circle_through_a_lazy_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_outbox_module_imports_a_private_name_of_another():
    offenders = [
        f"{path.relative_to(ROOT)}: from {module} import {imported}"
        for path in modules().values()
        for module, imported in imports(path)
        if module.startswith(PACKAGE) and imported and imported.startswith("_") and not imported.startswith("__")
    ]
    assert offenders == []


def test_the_outbox_app_imports_nothing_from_the_project_or_the_listeners():
    upward = [
        f"{path.relative_to(ROOT)}: {module}"
        for path in modules().values()
        for module, _ in imports(path)
        if module.split(".")[0] in {"ticketing", "listeners"}
    ]
    assert upward == []


def test_no_outbox_module_kills_its_own_process():
    """Crash tests inject crashes through outbox.relay.hooks (tests/crashing_relay.py)."""
    assert [str(p.relative_to(ROOT)) for p in modules().values() if "os.kill" in p.read_text()] == []
