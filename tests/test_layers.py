"""The house rules that a reader relies on: layers point one way, and functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["cxr_embed", "probes", "service"]  # each may import only those before it
MAX_FUNCTION_LINES = 60


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", LAYERS)
def test_layers_point_one_way(package):
    above = set(LAYERS[LAYERS.index(package) + 1:])
    bad = {f"{p.relative_to(ROOT)} imports {', '.join(sorted(_imports(p) & above))}"
           for p in (ROOT / package).rglob("*.py") if _imports(p) & above}
    assert not bad, sorted(bad)


def test_functions_are_short():
    long = []
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_the_layer_check_can_fail(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("import service.app\nfrom probes.io import load_probe\n")
    assert _imports(bad) == {"service", "probes"}
