"""The project's floors, one way down: a module may import its own floor or a lower one, never a higher one,
and no group of modules imports itself in a circle.

    0  utils/                      errors, files, config, logs, distributed, metrics, checkpoint I/O, run folder
    1  datasets/ models/ losses/   stand on utils
    2  trainer/                    stands on them
    3  analysis/                   reads finished runs (tables, plots, figures)
    4  main.py, benchmarks/, download_ade20k.py

Every import counts, also one inside a function (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"utils": 0, "datasets": 1, "models": 1, "losses": 1, "trainer": 2, "analysis": 3,
          "main": 4, "benchmarks": 4, "download_ade20k": 4}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path) -> dict[str, Path]:
    """Every Python module of the project (tests and the virtual environment left out)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        top = path.relative_to(root).parts[0]
        if top.removesuffix(".py") in FLOORS:
            modules[module_name(path, root)] = path
    return modules


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` (module ``name``) imports, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import mod` imports the module pkg.mod when there is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a module a.b plus attribute c
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = project_modules(root)
    known = set(modules)
    return {name: imported_modules(path, name, known) for name, path in modules.items()}


def floor(module: str) -> int:
    return FLOORS[module.split(".")[0]]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)})"
                  for module, targets in graph.items() for target in targets if floor(target) > floor(module))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_every_top_level_package_has_a_floor():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages - {"tests"} <= set(FLOORS), f"give these a floor in tests/test_layers.py: {packages - set(FLOORS)}"


def test_no_module_imports_a_higher_floor():
    assert upward_imports(import_graph(ROOT)) == []


def test_no_circle_of_imports():
    assert circles(import_graph(ROOT)) == []


def test_utils_imports_nothing_else_of_the_project():
    graph = import_graph(ROOT)
    assert {t for m, ts in graph.items() if m.startswith("utils") for t in ts if not t.startswith("utils")} == set()


# The checks must be able to fail: a planted upward import and a planted circle are found.
@pytest.fixture
def planted(tmp_path: Path) -> Path:
    for package in ("utils", "datasets", "analysis"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "utils" / "config.py").write_text("from analysis.report import main\n")
    (tmp_path / "analysis" / "report.py").write_text("import numpy\n\ndef main():\n    pass\n")
    (tmp_path / "datasets" / "a.py").write_text("from . import b\n")
    (tmp_path / "datasets" / "b.py").write_text("def f():\n    from .a import g\n")
    return tmp_path


def test_a_planted_upward_import_is_found(planted: Path):
    assert upward_imports(import_graph(planted)) == [
        "utils.config (floor 0) imports analysis.report (floor 3)"]


def test_a_planted_circle_is_found(planted: Path):
    assert circles(import_graph(planted)) == [["datasets.a", "datasets.b"]]
