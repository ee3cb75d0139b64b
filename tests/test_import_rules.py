"""The dependency direction of the house: the two apps never import the example project.

``outbox`` imports nothing from ``listeners`` or the example; ``listeners`` imports ``outbox``
but never the example. Checked on the source (every import statement, including the ones
inside functions), so a lazy import cannot slip through.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = {"ticketing", "tests", "benchmarks", "scripts"}
FORBIDDEN = {"outbox": EXAMPLE | {"listeners"}, "listeners": EXAMPLE}


def imported_packages(path: Path) -> set[tuple[int, str]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, alias.name.split(".")[0]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_the_app_imports_nothing_from_the_example_project(package):
    breaches = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, name in sorted(imported_packages(path))
        if name in FORBIDDEN[package]
    ]
    assert breaches == []


def test_the_rule_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from ticketing.models import Ticket\n    import listeners.base\n")
    assert imported_packages(module) == {(2, "ticketing"), (3, "listeners")}
