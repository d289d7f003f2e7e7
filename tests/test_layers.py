"""The package's shape: imports run one way, and every module stays small.

Layers, lowest first: ``errors``/``validate`` (shared by all), ``cqs``
(planning, pure), ``kernels``, ``storage``, ``pipeline``, then the entry
points (``attention``, ``estimate``, ``cli``, the package itself). A module
may import from its own layer or a lower one, never a higher one, so a
planner change can never depend on how stores or passes work.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "streamcqsa"
RANK = {
    "errors": 0,
    "validate": 0,
    "cqs": 1,
    "kernels": 2,
    "storage": 3,
    "pipeline": 4,
    "attention": 5,
    "estimate": 5,
    "cli": 6,
    "__main__": 6,
    "__init__": 6,
}
MAX_LINES = 400
MODULES = sorted(ROOT.rglob("*.py"))


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return [m for m in out if m == "streamcqsa" or m.startswith("streamcqsa.")]


def test_every_module_has_a_layer():
    layers = {p.relative_to(ROOT).with_suffix("").parts[0] for p in MODULES}
    assert layers <= set(RANK), f"modules outside the known layers: {layers - set(RANK)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    own = RANK[path.relative_to(ROOT).with_suffix("").parts[0]]
    upward = [m for m in _imports(path) if RANK[_layer(m)] > own]
    assert not upward, f"{path.name} imports from a higher layer: {upward}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines < MAX_LINES, f"{path.name}: {lines} lines; split it by job"
