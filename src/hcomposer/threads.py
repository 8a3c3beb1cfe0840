"""How many threads torch uses, and how its OpenMP threads wait (read once, before torch loads).

placeholder: decided by benchmarks/bench_load.py
"""

from __future__ import annotations

import os

__all__ = ["apply_thread_policy"]


def apply_thread_policy() -> None:
    """Set the OpenMP wait policy unless the user chose one (``OMP_WAIT_POLICY``)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
