"""The package's modules import one another in one direction only: no import circle.

Every import statement counts, at any level (inside functions too) and so does
importlib.import_module with a literal name; imports under `if TYPE_CHECKING:` do not (they never
run), nor do the package root's lazy exports (its __getattr__ resolves names by table).
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

import purifyguard

PACKAGE = Path(purifyguard.__file__).parent


def module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    return skipped


def imported_names(module: str, path: Path, tree: ast.AST) -> list[str]:
    """Every purifyguard name the module imports, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skipped = type_checking_nodes(tree)
    names = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names += [f"{base}.{alias.name}" for alias in node.names]  # a module, or a name in base
        elif (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module")
              and node.args and isinstance(node.args[0], ast.Constant)):
            names.append(node.args[0].value)
    return [name for name in names if name.split(".")[0] == "purifyguard"]


def import_graph() -> nx.DiGraph:
    files = module_files()

    def owner(name: str) -> str | None:  # the module a dotted name is, or lives in
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        for name in imported_names(module, path, ast.parse(path.read_text())):
            target = owner(name)
            if target and target != module:
                graph.add_edge(module, target)
    return graph


def test_the_walk_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert graph.has_edge("purifyguard.purifier", "purifyguard.samplers")  # module level
    assert graph.has_edge("purifyguard.presets", "purifyguard.cifar10")  # inside a function
    assert len(graph) > 50


def test_no_import_cycle():
    cycles = sorted(" -> ".join(cycle) for cycle in nx.simple_cycles(import_graph()))
    assert not cycles, "import circles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("source, expected", [
    ("import purifyguard.a\n", True),
    ("def f():\n    from purifyguard import a\n", True),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from purifyguard import a\n", False),
    ("import importlib\nimportlib.import_module('purifyguard.a')\n", True),
])
def test_the_walk_on_planted_modules(source, expected):
    names = imported_names("purifyguard.b", Path("purifyguard/b.py"), ast.parse(source))
    assert ("purifyguard.a" in names) is expected
