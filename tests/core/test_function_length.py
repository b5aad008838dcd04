"""Code that fits on a screen: the training loop (`trainer._train`) at most 60 lines with no branch on the sharding
mode (that lives in `mmopd/models/sharding.py: Parallel`), and no function in mmopd/ over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

MMOPD = Path(__file__).resolve().parents[2] / "mmopd"
LOOP_LINES = 60
FUNCTION_LINES = 80


def _functions() -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function and method in mmopd/, by `path: qualified name` (decorators not counted)."""
    found = {}
    for path in sorted(MMOPD.rglob("*.py")):
        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        found[f"{path.relative_to(MMOPD.parent)}: {name}"] = child
                    visit(child, name + ".")

        visit(ast.parse(path.read_text()), "")
    return found


def _lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def test_the_training_loop_is_at_most_60_lines_and_never_branches_on_the_sharding_mode():
    loop = _functions()["mmopd/run/trainer.py: _train"]
    assert _lines(loop) <= LOOP_LINES
    tests = [ast.unparse(node.test) for node in ast.walk(loop) if isinstance(node, (ast.If, ast.IfExp, ast.While))]
    assert tests and [test for test in tests if "shard" in test.lower() or "fsdp" in test.lower()] == []


def test_no_function_in_mmopd_is_longer_than_80_lines():
    functions = _functions()
    assert len(functions) > 100  # the walk found the package's functions, methods and nested functions
    assert {name: _lines(node) for name, node in functions.items() if _lines(node) > FUNCTION_LINES} == {}
