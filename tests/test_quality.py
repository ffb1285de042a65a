"""The code passes its own bar: ruff and strict mypy."""

from __future__ import annotations

import subprocess

from .conftest import ROOT


def test_ruff() -> None:
    done = subprocess.run([str(ROOT / ".venv/bin/ruff"), "check", "src", "tests", "bench"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout


def test_mypy_strict() -> None:
    done = subprocess.run([str(ROOT / ".venv/bin/mypy")], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout
