"""How torch's OpenMP threads wait: the policy under load, applied before torch loads.

With OpenMP's default policy, a thread that finishes its share of a parallel region spins
for a while before it sleeps. On a small machine shared with another busy process, the
threads of one region then spin while the thread that lost its core to the other process
is descheduled: the issue's measurement on 2 cores (``hcomposer train "(AF)*6" --shape 10m``)
kept 0.30 of the quiet throughput beside one busy process, against 0.60 with
``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once) and 0.61 with one thread -- but one
thread gives up the second core when the machine is quiet. ``PASSIVE`` keeps both cores
and costs little when quiet (``benchmarks/bench_load.py``; ``benchmarks/RESULTS.md``).

The knob is the standard variable: ``hcomposer`` sets ``OMP_WAIT_POLICY=PASSIVE`` only when
it is unset, so ``OMP_WAIT_POLICY=ACTIVE hcomposer ...`` restores spinning, and
``OMP_NUM_THREADS`` / ``--threads`` (proxies) still choose the thread count. The proxies
run one thread per evaluation already (``ProxyConfig.threads``).
"""

from __future__ import annotations

import os

__all__ = ["apply_thread_policy", "WAIT_POLICY"]

WAIT_POLICY = "PASSIVE"


def apply_thread_policy() -> None:
    """Set ``OMP_WAIT_POLICY`` unless the user chose one. Effective only before torch loads
    (OpenMP reads it once); the CLI calls this first thing."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
