"""The code base stays ruff-clean (lint and format) and type-checks (mypy over src/, zero errors, no
`type: ignore`), checked with the same tests everything else is. The tools come with the dev extra: a machine
without them fails here rather than skipping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["ruff", "check"], ["ruff", "format", "--check"]])
def test_ruff(command):
    proc = subprocess.run([sys.executable, "-m", *command, "src", "tests", "bench"], cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_finds_no_errors_in_src():
    """The configuration is pyproject.toml's [tool.mypy] (the model libraries read as Any at their boundary)."""
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "type: ignore" not in "".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
