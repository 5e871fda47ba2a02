"""The import graph of ``t3d_kernels`` and ``t3d``: no cycle, no arrow that points up (docs/design.md, "Layers").

Walks every module's AST, imports inside functions included (they hide cycles from the interpreter, not from this
test). Layers, from the bottom:

0. kernels and leaves: ``t3d_kernels.triton``, ``t3d_kernels.composite``, ``t3d_kernels.geometry``,
   ``t3d_kernels._ext``, ``t3d_kernels.reference``
1. ops and their dispatch: ``t3d_kernels.ops``, ``t3d_kernels.backends``
2. modules and the public API: ``t3d_kernels.nn``, ``t3d_kernels.convert``, ``t3d_kernels`` (the package),
   ``t3d_kernels.testing``
3. models and data: ``t3d.models``, ``t3d.data``
4. everything else of ``t3d``: trainers, CLI, checkpoints, ...

A module may import its own layer or a lower one. The reference (the ground truth the kernels are checked against)
is imported only by the package (it re-exports it), the ops (their ``reference`` backend) and ``t3d_kernels.testing``;
tests and benchmarks are not walked.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("t3d_kernels", "t3d")

LAYERS = {
    "t3d_kernels.triton": 0,
    "t3d_kernels.composite": 0,
    "t3d_kernels.geometry": 0,
    "t3d_kernels._ext": 0,
    "t3d_kernels.reference": 0,
    "t3d_kernels.ops": 1,
    "t3d_kernels.backends": 1,
    "t3d_kernels.nn": 2,
    "t3d_kernels.convert": 2,
    "t3d_kernels.testing": 2,
    "t3d_kernels": 2,
    "t3d.models": 3,
    "t3d.data": 3,
    "t3d": 4,
}
REFERENCE = "t3d_kernels.reference"
# exact modules, or (ending in ".") every module of a package
REFERENCE_IMPORTERS = ("t3d_kernels", "t3d_kernels.testing", "t3d_kernels.ops.")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the walked packages that ``name`` imports, anywhere in its body. ``from pkg import x`` is an arrow
    to ``pkg.x`` when that is a module, else to ``pkg``; the implicit imports of parent packages are not arrows."""
    base = name if _is_package(name, modules) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a walked package: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _layer(name: str) -> int:
    key = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)
    return LAYERS[key]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_is_walked():
    graph = _graph()
    # the arrows this test exists for are seen, imports inside functions included
    assert "t3d_kernels.composite.dense_block" in graph["t3d_kernels.triton.dense_block"]
    assert "t3d_kernels.triton.ttl" in graph["t3d_kernels.ops.ttl"]
    assert "t3d_kernels.nn" in graph["t3d_kernels"]
    assert {"t3d.train", "t3d.evaluate", "t3d.models"} <= set(graph)


def test_no_import_cycle():
    assert _cycles(_graph()) == [], "import cycles (cut one arrow of each)"


def test_no_upward_arrow():
    graph = _graph()
    upward = [
        f"{v} (layer {_layer(v)}) imports {w} (layer {_layer(w)})"
        for v, ws in sorted(graph.items())
        for w in sorted(ws)
        if _layer(w) > _layer(v)
    ]
    assert upward == []


def test_reference_imported_only_by_its_backend():
    graph = _graph()
    importers = sorted(v for v, ws in graph.items() if REFERENCE in ws)
    refused = [
        v for v in importers if not any(v == a or (a.endswith(".") and v.startswith(a)) for a in REFERENCE_IMPORTERS)
    ]
    assert refused == [], f"only {REFERENCE_IMPORTERS} may import the reference"
