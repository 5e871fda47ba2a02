"""Packaging: a console script imports only what the package declares (or guards an optional import with a clear
message), and benchmarks/ installs as ``t3d_benchmarks`` (no top-level ``benchmarks`` package), so its modules
import each other relatively. Static checks of the source (AST), no install and no network."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# import name -> distribution name, where the two differ
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml"}


def _setup_keyword(name: str):
    """The literal value of ``setup(name=...)`` in setup.py (None when absent or not a literal)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for kw in node.keywords:
                if kw.arg == name:
                    try:
                        return ast.literal_eval(kw.value)
                    except ValueError:
                        return None
    return None


PACKAGE_DIR: dict[str, str] = _setup_keyword("package_dir") or {}
PROJECT_PACKAGES = {"t3d_kernels", "t3d", *PACKAGE_DIR}


def _file(module: str) -> Path | None:
    """The source file of a project module (``t3d_benchmarks.cli`` -> benchmarks/cli.py), None if not one."""
    parts = module.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    base = ROOT / PACKAGE_DIR.get(parts[0], parts[0]) / Path(*parts[1:]) if len(parts) > 1 else None
    base = base if base is not None else ROOT / PACKAGE_DIR.get(parts[0], parts[0])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside a ``try`` whose handlers catch ImportError / ModuleNotFoundError (an optional import)."""
    while node in parents:
        child, node = node, parents[node]
        if isinstance(node, ast.Try) and child in node.body:
            for handler in node.handlers:
                names = ast.unparse(handler.type) if handler.type is not None else "BaseException"
                if re.search(r"\b(ImportError|ModuleNotFoundError)\b", names):
                    return True
    return False


def _imports(module: str, top_level_only: bool) -> set[str]:
    """Absolute names of the modules ``module`` imports, optional (guarded) imports left out; with
    ``top_level_only``, only the imports that run when the module is imported (not those inside functions)."""
    path = _file(module)
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or _guarded(node, parents):
            continue
        if top_level_only:
            p, inside_function = node, False
            while p in parents:
                p = parents[p]
                inside_function |= isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if inside_function:
                continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module
        found.add(target)
        found |= {f"{target}.{alias.name}" for alias in node.names if _file(f"{target}.{alias.name}")}
    return found


def _closure(roots: list[str], top_level_only: bool) -> tuple[set[str], set[str]]:
    """(project modules reached from ``roots``, third-party top-level names they import)."""
    seen, external, todo = set(), set(), list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b first
        for name in _imports(module, top_level_only):
            if _file(name) is not None:
                todo.append(name)
            elif name.split(".")[0] not in sys.stdlib_module_names and name.split(".")[0] not in PROJECT_PACKAGES:
                external.add(name.split(".")[0])
    return seen, external


def _declared() -> set[str]:
    names = set()
    for requirement in PYPROJECT["project"]["dependencies"]:
        names.add(re.split(r"[\s<>=!;\[~]", requirement, maxsplit=1)[0].lower())
    return names


def _harness_modules() -> list[str]:
    """The modules of the installed benchmarks package that t3d-bench always runs: every one but the op files
    (``bench_*.py``, loaded by name; a module one of them lacks gives a "skipped: missing module" or an error row,
    see test_benchmarks.py) and the pytest files."""
    folder = ROOT / PACKAGE_DIR["t3d_benchmarks"]
    return [
        f"t3d_benchmarks.{p.stem}"
        for p in sorted(folder.glob("*.py"))
        if not p.stem.startswith(("bench_", "test_")) and p.stem not in ("conftest", "__init__")
    ]


SCRIPTS = PYPROJECT["project"]["scripts"]


def test_benchmarks_install_under_the_projects_own_name():
    assert PACKAGE_DIR == {"t3d_benchmarks": "benchmarks"}
    assert "benchmarks" not in (_setup_keyword("packages") or [])  # packages= is computed; checked below
    assert SCRIPTS["t3d-bench"] == "t3d_benchmarks.cli:main"
    # a module of the package that imported `benchmarks.` absolutely would break in the installed package
    for path in (ROOT / "benchmarks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("benchmarks"), f"{path.name}: absolute import of {node.module}"
            if isinstance(node, ast.Import):
                bad = [a.name for a in node.names if a.name.split(".")[0] == "benchmarks"]
                assert not bad, f"{path.name}: absolute import of {bad}"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_imports_are_declared_dependencies(script):
    """What runs when the script starts (its module-level import closure, e.g. for --help) is declared."""
    module = SCRIPTS[script].split(":")[0]
    modules, external = _closure([module], top_level_only=True)
    assert module in modules
    assert {DISTRIBUTION.get(n, n).lower() for n in external} <= _declared(), (script, external)


def test_t3d_bench_imports_nothing_undeclared_even_lazily():
    """Every import anywhere in the harness behind t3d-bench is a declared dependency or an optional one guarded
    by ``except ImportError`` (rich, matplotlib: plain output and a message without them)."""
    modules, external = _closure(_harness_modules(), top_level_only=False)
    assert "t3d_benchmarks.runner" in modules and "t3d_benchmarks.output" in modules
    assert {DISTRIBUTION.get(n, n).lower() for n in external} <= _declared(), external
