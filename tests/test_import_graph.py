"""maskar's modules import each other without cycles.

A static walk of every ``import`` / ``from ... import`` statement in every module under
``maskar/``, at module level and inside functions alike (a function-level import that
closes a loop still couples the two modules both ways; it only hides the failure until
the function runs). Imports under ``if TYPE_CHECKING:`` never execute and are skipped.
Dynamic ``importlib.import_module`` calls are not followed: the registry's lazy loading of
the model modules is the one intended upward lookup (docs/architecture.md).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "maskar"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Every absolute module name an import statement names, with its line."""
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            # ``from pkg import name`` imports the submodule pkg.name when there is one.
            out.extend((f"{base}.{alias.name}", node.lineno) for alias in node.names)
            out.append((base, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


@functools.cache
def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported maskar module: first line}; names that are not modules are dropped.

    Cached: treat the result as read-only."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: dict[str, int] = {}
        for target, line in _imported_names(tree, name, path.name == "__init__.py"):
            if target in modules and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def test_walk_sees_the_package():
    graph = import_graph()
    # The walk must see both kinds of import, or an empty graph would pass trivially.
    assert "maskar.cli" in graph and "maskar.config" in graph["maskar.cli"]  # module level
    assert "maskar.train.trainer" in graph["maskar.cli"]  # inside cmd_train
    assert sum(len(e) for e in graph.values()) > 100


def test_cycle_finder_reports_a_loop():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_relative_and_type_checking_imports_are_resolved():
    src = (
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from .. import config\n"
        "if TYPE_CHECKING:\n"
        "    from maskar import registry\n"
        "def f():\n"
        "    import maskar.cli\n"
    )
    names = {n for n, _ in _imported_names(ast.parse(src), "maskar.eval.run", False)}
    assert {"maskar.eval.sibling", "maskar.config", "maskar.cli"} <= names
    assert "maskar.registry" not in names


def test_no_import_cycles_inside_maskar():
    graph = import_graph()
    cycles = find_cycles(graph)
    if cycles:
        lines = []
        for comp in cycles:
            members = set(comp)
            for m in comp:
                for t, line in sorted(graph[m].items()):
                    if t in members:
                        lines.append(f"  {m} -> {t} (line {line})")
        pytest.fail("import cycles in maskar:\n" + "\n".join(lines))


# docs/architecture.md, *Layers*: top-level module or package -> layer. A module may import its
# own package and lower layers only.
LAYERS = {
    "maskar": 0, "config_base": 0, "env": 0, "config": 0, "registry": 0, "checkpoint": 0, "cli_args": 0,
    "data": 1, "tokenizers": 1, "nn": 1, "kernels": 1,
    "models": 2,
    "sampling": 3, "train": 3, "eval": 3, "bench": 3, "convert": 3,
    "cli": 4, "__main__": 4,
}  # fmt: skip


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_module_has_a_layer():
    missing = sorted({_top(m) for m in import_graph()} - set(LAYERS))
    assert not missing, f"add these to LAYERS here and to docs/architecture.md, *Layers*: {missing}"


def test_imports_point_down_the_layers():
    graph = import_graph()
    upward = [
        f"  {m} (layer {LAYERS[_top(m)]}) -> {t} (layer {LAYERS[_top(t)]}), line {line}"
        for m, edges in sorted(graph.items())
        for t, line in sorted(edges.items())
        if LAYERS.get(_top(t), 0) > LAYERS.get(_top(m), 0)
    ]
    assert not upward, "imports of a higher layer (docs/architecture.md, *Layers*):\n" + "\n".join(upward)
