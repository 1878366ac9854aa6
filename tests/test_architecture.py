"""Structural rules of the package (issue 12): the engine opens every nnsight trace, its private
names stay inside it. (The import layers are checked by `lint-imports` in .ci/run.)"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pie_lib"
ENGINE = PKG / "engine"
NNSIGHT_CONTEXTS = {"trace", "session", "generate", "scan", "edit"}


def _traces(tree: ast.AST) -> list[int]:
    """Lines of ``with <x>.trace(...)`` / ``.session`` / ``.generate`` ... (nnsight contexts)."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, (ast.With, ast.AsyncWith))
        for item in node.items
        if isinstance(item.context_expr, ast.Call)
        and isinstance(item.context_expr.func, ast.Attribute)
        and item.context_expr.func.attr in NNSIGHT_CONTEXTS
    ]


def _private_engine_imports(tree: ast.AST) -> list[str]:
    return [
        a.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pie_lib.engine")
        for a in node.names
        if a.name.startswith("_")
    ]


def _outside_engine() -> list[tuple[str, ast.Module]]:
    return [
        (str(p.relative_to(PKG.parent)), ast.parse(p.read_text(encoding="utf-8")))
        for p in sorted(PKG.rglob("*.py"))
        if ENGINE not in p.parents
    ]


def test_only_the_engine_opens_nnsight_contexts():
    offenders = [f"{name}:{line}" for name, tree in _outside_engine() for line in _traces(tree)]
    assert not offenders, offenders


def test_no_private_engine_name_outside_the_engine():
    offenders = [f"{name}: {n}" for name, tree in _outside_engine() for n in _private_engine_imports(tree)]
    assert not offenders, offenders


def test_the_scanners_can_fail():
    tree = ast.parse(
        "from pie_lib.engine.traces import _val, run_with_cache\n"
        "with torch.no_grad(), model.lm.trace(ids):\n    pass\n"
        "with open(p) as fh:\n    pass\n"
        "out = model.generate(ids)\n"  # a plain HF generate call, not an nnsight context
    )
    assert _traces(tree) == [2]
    assert _private_engine_imports(tree) == ["_val"]
