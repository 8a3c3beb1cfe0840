"""The code passes the project's own lint rules (pyproject's ``[tool.ruff]``): among them,
names that are used but never defined (F821), which a merge can leave behind on a branch no
CPU test reaches (a CUDA-only line)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.is_file():
        return [str(exe)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed (it comes with the dev extra)")


def test_ruff_check_is_clean():
    out = subprocess.run([*_ruff(), "check", "--no-cache", "src", "tests", "benchmarks", "scripts"],
                         cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def test_ruff_finds_an_undefined_name(tmp_path):
    """The check above can fail: an undefined name in a file is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f(x):\n    return x if x else not_defined_anywhere()\n")
    out = subprocess.run([*_ruff(), "check", "--no-cache", "--select", "F821", str(bad)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 1 and "F821" in out.stdout
