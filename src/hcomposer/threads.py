"""Torch's CPU threads under load: the wait policy (set before torch loads) and, for training,
a thread count that follows how many cores other processes are using.

With OpenMP's default policy, a thread that finishes its share of a parallel region spins for
a while before it sleeps. On a small machine shared with another busy process, the threads of
one region then spin while the thread that lost its core to the other process is descheduled.
Measured on 2 cores (``benchmarks/bench_load.py``; "load" in ``docs/history/results-log.md``;
fp32 training of ``(AF)*6`` at shape ``10m``, one round): two threads with the default policy
keep 0.35 of their quiet throughput beside one busy process; ``OMP_WAIT_POLICY=PASSIVE``
(threads sleep at once) keeps 0.52 but costs 14% when quiet; one thread keeps 0.56 loaded but
gives up the second core when quiet (0.54). No fixed setting is both fast when quiet and
graceful when loaded, so:

- ``hcomposer train`` chooses its thread count as it goes (:class:`AdaptiveThreads`): all
  usable cores when the machine is idle, one fewer for each core other processes keep busy,
  re-checked every :data:`THREADS_EVERY` optimiser steps. Spin-waiting is then kept (it is the
  faster policy when quiet; when loaded the count drops and the wait matters little).
- Every other command runs under ``OMP_WAIT_POLICY=PASSIVE`` (the proxies run one thread per
  evaluation already, ``ProxyConfig.threads``).

How busy the other processes are: two samples of the CPU times (``psutil.cpu_times``, per CPU,
in seconds; on Linux psutil reads ``/proc/stat``) of the CPUs this process may run on give the
busy CPU time over the interval; this process's own CPU time (``time.process_time``) over the
same interval is taken off. Time of processes with a positive nice value is counted only when
this process is niced too: a niced job barely slows a process at nice 0 (the scheduler weighs
nice 0 about ten times nice 10). Hypervisor steal counts as busy. Where the affinity is unknown
(macOS has no ``sched_getaffinity``) every CPU is looked at. Where psutil cannot read the CPU
times nothing is chosen and torch keeps its default. CPU limits set by a container's cgroup
quota are not seen.

The knobs: ``hcomposer train --threads N`` fixes the count (0, the default, adapts);
``OMP_NUM_THREADS`` in the environment fixes it too (the trainer then leaves torch alone, and
the CLI applies ``PASSIVE`` as for other commands); a user-set ``OMP_WAIT_POLICY`` is always
kept. In distributed runs (``WORLD_SIZE`` > 1) ``--threads 0`` leaves torch's count as
torchrun set it. ``hcomposer train --batch-threads N`` (N > 1) replaces intra-op parallelism
with N threads that each train a slice of the batch: the count is then fixed at 1 and nothing
here adapts it (``hcomposer.training.step.train_step``).

This module does not import torch: the CLI imports it before torch loads, and OpenMP reads its
wait policy once, when it loads. The trainer passes torch's thread setter in.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import psutil

__all__ = [
    "AUTO_SPLIT_MAX_CORES",
    "auto_batch_threads",
    "WAIT_POLICY",
    "THREADS_EVERY",
    "SAMPLE_SECONDS",
    "CpuSample",
    "AdaptiveThreads",
    "apply_thread_policy",
    "adapts",
    "cpu_sample",
    "busy_by_others",
    "thread_count",
    "choose_threads",
    "usable_cores",
]

WAIT_POLICY = "PASSIVE"
# Commands that choose their own thread count and keep OpenMP's spin-waiting.
ADAPTIVE_COMMANDS = frozenset({"train"})
# Optimiser steps between re-checks of the load (a step of the 10m shape takes ~1.7 s on 2 cores).
THREADS_EVERY = 50
# The shortest interval the load is measured over (at Linux's 100 ticks/s: 20 ticks per core).
SAMPLE_SECONDS = 0.2

# CPU-time fields that are already inside others: Linux's guest and guest_nice (inside user
# and nice). psutil's own cpu_percent leaves out the same two.
_COUNTED_ELSEWHERE = frozenset({"guest", "guest_nice"})
# Time a CPU had nothing to run (waiting for I/O is idle: the CPU could have run us).
_IDLE_FIELDS = frozenset({"idle", "iowait"})


def apply_thread_policy(command: str | None = None) -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for ``command`` unless the user chose a policy, or the
    command adapts its thread count (:func:`adapts`). Effective only before torch loads
    (OpenMP reads it once); the CLI calls this first thing."""
    if not adapts(command):
        os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def adapts(command: str | None, environ: dict[str, str] | None = None) -> bool:
    """Whether ``command`` chooses its own thread count: ``train``, unless ``OMP_NUM_THREADS``
    is set or the run is distributed (``WORLD_SIZE`` > 1)."""
    env = os.environ if environ is None else environ
    if command not in ADAPTIVE_COMMANDS or env.get("OMP_NUM_THREADS"):
        return False
    try:
        return int(env.get("WORLD_SIZE", "1")) <= 1
    except ValueError:
        return True


@dataclass(frozen=True)
class CpuSample:
    """One look at the CPUs: each CPU's times in seconds, in CPU order, as
    ``psutil.cpu_times(percpu=True)`` gives them (named tuples whose fields vary by platform:
    Linux has user nice system idle iowait irq softirq steal guest guest_nice, macOS user nice
    system idle), and this process's CPU seconds."""

    cpus: tuple[Any, ...]
    own_seconds: float


# The batch split (--batch-threads) is chosen automatically on machines with at most this
# many usable cores: measured on 2 cores (benchmarks/RESULTS.md, row train-load); each batch thread
# holds its own copy of the gradients, and on larger machines intra-op threads are untested
# against it, so they keep the adaptive intra-op count.
AUTO_SPLIT_MAX_CORES = 4


def auto_batch_threads(
    *,
    usable: int,
    cpu: bool,
    threads: int | None,
    rows: int,
    excluded: bool,
    environ: dict[str, str] | None = None,
) -> int:
    """What ``hcomposer train --batch-threads 0`` (the default) uses: one batch thread per usable
    core on a CPU with 2 to :data:`AUTO_SPLIT_MAX_CORES` cores, else 1 (no split).

    No split either when the device is not the CPU, the user fixed the intra-op count
    (``threads`` > 1 or ``OMP_NUM_THREADS``), the run is distributed (``WORLD_SIZE`` > 1), a
    micro-batch has fewer than 2 rows, or ``excluded`` (compile, FSDP, layers whose forward
    updates shared state).
    """
    env = os.environ if environ is None else environ
    if not cpu or excluded or (threads or 0) > 1 or env.get("OMP_NUM_THREADS"):
        return 1
    try:
        if int(env.get("WORLD_SIZE", "1")) > 1:
            return 1
    except ValueError:
        pass
    if not 2 <= usable <= AUTO_SPLIT_MAX_CORES:
        return 1
    return max(1, min(usable, rows))


def usable_cores() -> int:
    """The cores this process may run on (its affinity), or ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def cpu_sample() -> CpuSample | None:
    """The CPUs' times (psutil) and ``time.process_time()`` now; None where psutil cannot read
    them."""
    try:
        times = psutil.cpu_times(percpu=True)
    except (OSError, NotImplementedError):
        return None
    if not times:
        return None
    return CpuSample(tuple(times), time.process_time())


def _seconds(
    sample: CpuSample, cpus: Collection[int] | None, count_nice: bool
) -> tuple[float, float, int]:
    """``(busy, total, n)``: seconds summed over the CPUs ``cpus`` (None: all of them), and over
    how many CPUs. A CPU's number is its place in psutil's list (the order of ``/proc/stat``,
    which lists online CPUs only: with a CPU taken offline the numbers after it shift)."""
    if cpus is None:
        chosen = list(sample.cpus)
    else:
        chosen = [t for cpu, t in enumerate(sample.cpus) if cpu in cpus]
    if not chosen:
        raise ValueError(f"none of CPUs {sorted(cpus or ())} among {len(sample.cpus)} CPUs")
    sums = [_busy_total(t, count_nice) for t in chosen]
    return sum(b for b, _ in sums), sum(t for _, t in sums), len(chosen)


def _busy_total(times: Any, count_nice: bool) -> tuple[float, float]:
    """Busy and total seconds of one CPU's times: every field but idle and I/O wait is busy
    (user, system, irq, softirq, steal; nice when ``count_nice``)."""
    fields = {k: float(v) for k, v in times._asdict().items() if k not in _COUNTED_ELSEWHERE}
    total = sum(fields.values())
    busy = total - sum(fields.get(k, 0.0) for k in _IDLE_FIELDS)
    if not count_nice:
        # Uncounted nice time is time these CPUs could give us: idle for this purpose.
        busy -= fields.get("nice", 0.0)
    return busy, total


def busy_by_others(
    before: CpuSample,
    after: CpuSample,
    *,
    cpus: Collection[int] | None = None,
    count_nice: bool = True,
    min_seconds: float = SAMPLE_SECONDS / 2,
) -> float | None:
    """Cores kept busy by other processes between two samples (0 or more), or None when the
    interval is shorter than ``min_seconds`` (too little CPU time to tell).

    ``cpus``: the CPUs to look at (None: all of them).
    """
    b0, t0, n = _seconds(before, cpus, count_nice)
    b1, t1, _ = _seconds(after, cpus, count_nice)
    # Seconds that passed on each CPU: the interval's length.
    per_cpu = (t1 - t0) / n
    if per_cpu <= 0 or per_cpu < min_seconds:
        return None
    own = after.own_seconds - before.own_seconds
    # psutil's seconds are whole clock ticks divided by the tick rate: rounding off the float
    # noise keeps half a core exactly half (thread_count rounds it up).
    return max(0.0, round((b1 - b0 - own) / per_cpu, 9))


def thread_count(others: float, usable: int) -> int:
    """Threads for ``usable`` cores while others keep ``others`` cores busy (half rounds up)."""
    return max(1, usable - math.floor(others + 0.5))


def _niced() -> bool:
    try:
        return os.getpriority(os.PRIO_PROCESS, 0) > 0
    except (AttributeError, OSError):
        return False


def _others(before: CpuSample, after: CpuSample) -> float | None:
    try:
        return busy_by_others(before, after, cpus=_affinity(), count_nice=_niced())
    except ValueError:  # the CPUs we may run on are not among psutil's: decide nothing
        return None


def choose_threads(seconds: float = SAMPLE_SECONDS) -> int | None:
    """The thread count for the load right now, measured over ``seconds`` (this call sleeps);
    None where the CPU times cannot be read."""
    before = cpu_sample()
    if before is None:
        return None
    time.sleep(seconds)
    after = cpu_sample()
    others = _others(before, after) if after is not None else None
    return None if others is None else thread_count(others, usable_cores())


class AdaptiveThreads:
    """A thread count that follows the load: :meth:`start`, then :meth:`update` every
    :data:`THREADS_EVERY` steps. ``set_threads`` is called only when the count changes (the
    trainer passes ``torch.set_num_threads``).

    Each check measures the other processes over the interval since the previous one (this
    process's own CPU time taken off), so checks cost one read of the CPU times; an interval
    shorter than :data:`SAMPLE_SECONDS` is extended to the next check.
    """

    def __init__(self, set_threads: Callable[[int], None], current: int | None = None):
        self._set = set_threads
        self.threads = current
        self._last: CpuSample | None = None

    def start(self) -> int | None:
        """Measure for :data:`SAMPLE_SECONDS` (sleeping) and set the count; None without CPU
        times."""
        self._last = cpu_sample()
        if self._last is None:
            return None
        time.sleep(SAMPLE_SECONDS)
        return self.update()

    def update(self) -> int | None:
        """Re-measure over the interval since the last check; set the count if it changed."""
        if self._last is None:
            return self.threads
        now = cpu_sample()
        others = _others(self._last, now) if now is not None else None
        if others is None:
            return self.threads
        self._last = now
        n = thread_count(others, usable_cores())
        if n != self.threads:
            self._set(n)
            self.threads = n
        return n
