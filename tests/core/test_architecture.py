"""The architecture as a specification: imports point one way and form no cycle, the core never imports a
modality, and the step dispatches on the objectives table, not on the types or ranks of its tensors."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from mmopd.run import objectives

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mmopd", "modalities")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The project's modules that an import statement names (`from a import b` names a.b when that is a module)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = {f"{node.module}.{alias.name}" for alias in node.names} & modules.keys()
        return names or ({node.module} & modules.keys())
    return set()


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """Import edges (wherever the import stands: module level, `if TYPE_CHECKING:` or a function body), and
    every import of the project's own modules made inside a function or class body."""
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    nested = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            edges[name] |= _imported(node, modules)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                nested += [f"{name}: {target}" for inner in ast.walk(node) for target in _imported(inner, modules)]
    return edges, nested


def test_the_import_graph_of_the_core_and_the_modalities_has_no_cycle():
    edges, _ = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_function_imports_the_projects_own_modules_and_the_core_never_imports_a_modality():
    edges, nested = _graph()
    assert nested == []
    assert {(a, b) for a, targets in edges.items() if a.startswith("mmopd") for b in targets
            if b.startswith("modalities")} == set()


def test_objective_step_has_no_type_or_rank_dispatch():
    source = inspect.getsource(objectives.objective_step)
    assert "isinstance" not in source and ".dim()" not in source
    assert len(source.splitlines()) <= 45
    assert "config" not in source and "row_of" not in source and "LOSSES" not in source  # a Plan, resolved once


FLOORS = ("data", "registry", "losses", "step", "config", "models", "engines", "run", "cli")  # mmopd/, bottom up


def test_each_folder_of_the_core_imports_only_from_its_own_floor_and_the_floors_under_it():
    edges, _ = _graph()
    part = lambda module: module.split(".")[1]  # mmopd.run.trainer -> run; mmopd.config -> config
    core = [name for name in edges if name.startswith("mmopd.")]
    assert {part(name) for name in core} == set(FLOORS), "a new folder of mmopd/ needs its floor in FLOORS"
    upward = sorted(f"{a} -> {b}" for a in core for b in edges[a]
                    if b.startswith("mmopd.") and FLOORS.index(part(b)) > FLOORS.index(part(a)))
    assert upward == []
