"""The package's boundaries, checked on the host: who imports bcc, no cycles, small classes."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "tracer_exporter"
MAX_CLASS_LINES = 200


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imports(name: str, tree: ast.Module, top_level_only: bool = False) -> set[str]:
    """What a module imports: every import, or those run when it is imported (not inside a function)."""
    nodes = list(_module_level(tree)) if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _module_level(node: ast.AST):
    """Every node but those inside a function (under if/try at module level included)."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield child
            yield from _module_level(child)


def test_only_the_kernel_package_imports_bcc():
    users = {
        name for name, tree in modules().items() if any(i == "bcc" or i.startswith("bcc.") for i in imports(name, tree))
    }
    assert users and all(u.startswith("tracer_exporter.kernel.") for u in users), users


def test_the_model_and_views_know_neither_the_kernel_nor_http():
    # The model handles the errors its backend raises (kernel.errors), and nothing else of the kernel.
    for name, tree in modules().items():
        if name.startswith(("tracer_exporter.model", "tracer_exporter.views")):
            bad = {
                i
                for i in imports(name, tree)
                if i.startswith(("tracer_exporter.kernel", "tracer_exporter.web", "tracer_exporter.cli"))
                and not (name.startswith("tracer_exporter.model") and i.startswith("tracer_exporter.kernel.errors"))
            }
            assert not bad, f"{name} imports {bad}"


def test_no_import_cycle():
    mods = modules()
    graph = {
        name: {i for i in imports(name, tree, top_level_only=True) if i in mods and i != name}
        for name, tree in mods.items()
    }
    # A package's __init__ is run by importing any of its modules: an edge to it is an edge.
    seen: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                cycle.extend([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
                return
            if nxt not in seen:
                visit(nxt, [*path, nxt])
            if cycle:
                return
        seen[node] = 2

    for name in sorted(graph):
        if name not in seen and not cycle:
            visit(name, [name])
    assert not cycle, " -> ".join(cycle)


def test_no_class_over_200_lines():
    big = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES
    ]
    assert big == []


def test_no_test_module_imports_another():
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        names = {i.split(".")[-1] for i in imports("", tree)} | {i.split(".")[0] for i in imports("", tree)}
        assert not {n for n in names if n.startswith("test_")}, path
