"""The layering of kdexp: no import cycle, and the runner knows methods only through their Needs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import kdexp

PACKAGE = Path(kdexp.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module → the kdexp modules it imports anywhere in its file (function-level and
    TYPE_CHECKING imports included), with the packages whose ``__init__`` such an import runs."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            # Importing a.b.c runs the __init__ of a and a.b first; a module's own packages are
            # already being imported when it runs, so they add no edge.
            own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:i])
                    if prefix in modules and prefix not in own:
                        graph[name].add(prefix)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    assert "kdexp.run" in graph["kdexp.cli"]  # cli imports run inside main()
    assert "kdexp.method" in graph["kdexp.pipeline"]  # the package's __init__ runs first


def test_no_import_cycle_inside_kdexp() -> None:
    assert cycles(import_graph()) == []


def test_generic_modules_import_no_concrete_method() -> None:
    """Outside kdexp/method/, only kdexp.method.base is imported (the contract), never a method."""
    graph = import_graph()
    for name, imported in graph.items():
        if name.startswith("kdexp.method"):
            continue
        concrete = sorted(
            m
            for m in imported
            if m.startswith("kdexp.method") and m not in ("kdexp.method", "kdexp.method.base")
        )
        assert concrete == [], f"{name} imports {concrete}"


def test_the_runner_reads_methods_only_through_needs() -> None:
    """No ``getattr(`` on a method or method class and no ``Baseline`` outside kdexp/method/."""
    for path in PACKAGE.rglob("*.py"):
        if "method" in path.relative_to(PACKAGE).parts[:1]:
            continue
        text = path.read_text()
        assert "Baseline" not in text, path
        assert not re.search(r"getattr\(\s*(method|method_class|self\.method)\b", text), path
