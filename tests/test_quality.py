"""The code passes its own bar: ruff, strict mypy, and layers that only look down."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from .conftest import ROOT


def test_ruff() -> None:
    done = subprocess.run([str(ROOT / ".venv/bin/ruff"), "check", "src", "tests", "bench"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout


def test_mypy_strict() -> None:
    done = subprocess.run([str(ROOT / ".venv/bin/mypy")], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout


LAYERS = ("vm", "guest", "introspect", "detect", "recover", "migrate", "faults", "orchestrate",
          "interfaces")
"""Bottom to top, as docs/architecture.md draws them; the modules at the package's top
(errors, polling, process, ...) are below them all."""


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("transmigrate")}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def test_no_import_runs_upward() -> None:
    source = ROOT / "src"
    upward = []
    for path in sorted((source / "transmigrate").rglob("*.py")):
        module = ".".join(path.relative_to(source).with_suffix("").parts)
        if path.name == "__init__.py":
            module += ".__init__"
        for imported in _imports(path):
            if _layer(imported) > _layer(module):
                upward.append(f"{module} imports {imported}")
    assert upward == []
