"""Load a script of the repository (a benchmark, a maintenance script) as a module, so tests
can call its functions: ``script("benchmarks/ruler_v3.py")``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def script(path: str | Path) -> ModuleType:
    """The module of ``path`` (relative to the repository root, or absolute), executed fresh."""
    path = ROOT / path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
