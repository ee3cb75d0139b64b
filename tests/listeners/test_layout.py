"""The shape of ``listeners``: no import circles, no private names across modules, one home for nats-py internals.

Read from the source with ``ast``: imports inside functions count as much as those at
the top, so a circle cannot hide behind a lazy import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nats

PACKAGE = Path(__file__).resolve().parents[2] / "listeners"
#: The one module allowed to reach into nats-py's private attributes.
NATS_INTERNALS_MODULE = "listeners.pull"


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def imported(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The modules of the package that ``name`` imports, anywhere in its source."""
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        targets.update(c for c in candidates if c in known and c != name)
    return targets


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: imported(name, tree, known) for name, tree in trees.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_imports_inside_functions():
    tree = ast.parse("def f():\n    from listeners.b import x\n")
    assert imported("listeners.a", tree, {"listeners.a", "listeners.b"}) == {"listeners.b"}


def test_listeners_modules_import_each_other_without_a_circle():
    graph = import_graph()
    assert {"listeners.runner", "listeners.apply", "listeners.pull"} <= set(graph)
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_no_module_imports_a_private_name_of_another():
    offenders = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("listeners"):
                offenders += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders


def _nats_private_attributes() -> set[str]:
    """Every ``_name`` nats-py defines: methods, and attributes it assigns on ``self``."""
    names = set()
    for path in Path(nats.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("_"):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_"):
                names.add(node.attr)
    return {n for n in names if not (n.startswith("__") and n.endswith("__"))}


def test_nats_py_internals_are_used_in_one_module_only():
    internals = _nats_private_attributes()
    used: dict[str, set[str]] = {}
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in internals
                and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"})
            ):
                used.setdefault(name, set()).add(node.attr)
    # Django's own private API (model ``_meta``, the connection's cursor factory) is not nats-py's.
    for name in list(used):
        used[name] -= {"_meta", "_prepare_cursor"}
        if not used[name]:
            del used[name]
    assert set(used) == {NATS_INTERNALS_MODULE}, used
