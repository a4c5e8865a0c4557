"""The package's import graph: which module may depend on which.

Every `import` in a module counts, at module level or inside a function: a function-level import
only delays a cycle to run time, it does not remove it.  The graph is read from the source (ast),
so nothing is imported to build it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vishwamai"

# Cycles not removed yet: checkpoint <-> hf <-> distill.teachers.  A new cycle fails; a known one that
# shrinks or goes still passes.
KNOWN_CYCLES: list[set[str]] = [
    {"vishwamai.checkpoint", "vishwamai.checkpoint.io", "vishwamai.checkpoint.manager", "vishwamai.checkpoint.resume",
     "vishwamai.checkpoint.state", "vishwamai.distill.teachers", "vishwamai.hf"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports: `from a.b import c` is a.b.c when c is a module, else a.b."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level-1 packages
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                         for alias in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_function_level_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [{"a", "b", "c"}]


@pytest.mark.parametrize("module", ["vishwamai.training_v2", "vishwamai.tune", "vishwamai.tune.trial",
                                    "vishwamai.compress.measure", "vishwamai.compress.quantize"])
def test_module_is_in_no_import_cycle(module):
    """Tuning sits above the recipe (the command line hands training_v2.run to the study, which never
    imports it back); measuring a model does not import the quantizer that uses the measurements."""
    graph = import_graph()
    assert module in graph
    assert [c for c in cycles(graph) if module in c] == []


def test_no_import_cycles_beyond_the_known_ones():
    new = [sorted(c) for c in cycles(import_graph()) if not any(c <= known for known in KNOWN_CYCLES)]
    assert new == []
