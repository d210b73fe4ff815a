"""Rules of the house that a reader relies on, checked on the source tree.

- no function in ``astrovl/`` or ``astrovl_napari/`` is longer than 120 lines: a job
  reads as its named steps;
- no module uses another module's private (``_name``) functions, classes or attributes:
  what two modules share is public, documented API.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("astrovl", "astrovl_napari")
MAX_FUNCTION_LINES = 120

pytestmark = pytest.mark.skipif(not (ROOT / "astrovl").is_dir(),
                                reason="needs the source tree (astrovl/)")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _modules(root: Path) -> dict[str, ast.Module]:
    trees = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            trees[path.relative_to(root).as_posix()] = ast.parse(path.read_text("utf-8"))
    return trees


def long_functions(root: Path) -> list[str]:
    """``path:line name (N lines)`` for every function over the limit."""
    found = []
    for name, tree in _modules(root).items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno} {node.name} ({length} lines)")
    return found


def _defined_private_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if _is_private(n)}


def private_uses_across_modules(root: Path) -> list[str]:
    """``path:line what`` for every use of a private name another module of ours defines."""
    trees = _modules(root)
    defined = {name: _defined_private_names(tree) for name, tree in trees.items()}
    found = []
    for name, tree in trees.items():
        others = set().union(*(d for m, d in defined.items() if m != name)) - defined[name]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                ours = node.level > 0 or (node.module or "").split(".")[0] in PACKAGES
                for alias in node.names:
                    if ours and _is_private(alias.name):
                        found.append(f"{name}:{node.lineno} imports {alias.name}")
            elif isinstance(node, ast.Attribute) and _is_private(node.attr) \
                    and node.attr in others:
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    continue
                found.append(f"{name}:{node.lineno} uses {ast.unparse(node)}")
    return found


def test_no_function_is_longer_than_the_limit():
    assert long_functions(ROOT) == []


def test_no_module_uses_another_modules_private_names():
    assert private_uses_across_modules(ROOT) == []


def test_the_checks_find_what_they_look_for(tmp_path):
    (tmp_path / "astrovl").mkdir()
    (tmp_path / "astrovl_napari").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "astrovl" / "a.py").write_text(
        f"def _helper():\n    pass\n\n\ndef long():\n{body}\n")
    (tmp_path / "astrovl" / "b.py").write_text(
        "from .a import _helper\nfrom . import a\n\n\ndef f(obj):\n    return a._helper, obj._own\n"
        "\n\nclass C:\n    def g(self):\n        self._own = 1\n")
    (tmp_path / "astrovl_napari" / "c.py").write_text("def f(v):\n    return v._canvas\n")
    assert long_functions(tmp_path) == [f"astrovl/a.py:5 long ({MAX_FUNCTION_LINES + 1} lines)"]
    assert private_uses_across_modules(tmp_path) == [
        "astrovl/b.py:1 imports _helper", "astrovl/b.py:6 uses a._helper"]
