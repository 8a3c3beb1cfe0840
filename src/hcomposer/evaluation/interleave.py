"""Interleaved timing: the models of a comparison measured in turn, in one process.

Measuring model A for a minute and then model B lets outside load land on one of them only
(a quickstart run beside one busy process put the composite's decoding at 0.15-0.79x the
baseline, against 0.57-0.96x on a quiet machine). Here every round runs each measurement once,
the order reversed every other round (A B C, C B A, ...) so that neither the first slot nor
the last is always the same model's, and ratios are taken per round: a burst of load that
lands on round r slows every model of that round, and their ratio keeps.

The clock is a parameter: ``time.process_time`` (CPU seconds of this process: time spent
descheduled by other processes does not count) for CPU work on one thread, wall time with a
device synchronisation for accelerators.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Spread", "spread", "Interleaved", "measure_interleaved", "round_order"]


@dataclass(frozen=True)
class Spread:
    """Median, quartiles (inclusive method) and range of a set of measurements."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def map(self, fn: Callable[[float], float]) -> Spread:
        """The spread of fn(values) for a decreasing or increasing fn (e.g. 1/x)."""
        a, b = fn(self.min), fn(self.max)
        q1, q3 = fn(self.q1), fn(self.q3)
        return Spread(fn(self.median), min(q1, q3), max(q1, q3), min(a, b), max(a, b), self.n)


def spread(values: Sequence[float]) -> Spread:
    """The Spread of ``values`` (at least one)."""
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("spread of no values")
    if len(vals) == 1:
        q1 = q3 = vals[0]
    else:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return Spread(statistics.median(vals), q1, q3, vals[0], vals[-1], len(vals))


def round_order(names: Sequence[str], r: int) -> list[str]:
    """The order of round ``r``: as given on even rounds, reversed on odd ones."""
    return list(names) if r % 2 == 0 else list(reversed(names))


@dataclass
class Interleaved:
    """Per-round seconds of each measurement (``times[name][r]``) and the order run."""

    times: dict[str, list[float]]
    order: list[str]

    def summary(self, name: str) -> Spread:
        return spread(self.times[name])

    def paired_ratios(self, num: str, den: str) -> list[float]:
        """times[num][r] / times[den][r] for every round r (same round, same load)."""
        return [a / b for a, b in zip(self.times[num], self.times[den], strict=True)]

    def ratio(self, num: str, den: str) -> Spread:
        return spread(self.paired_ratios(num, den))

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": {k: self.summary(k).to_dict() for k in self.times},
            "rounds": len(next(iter(self.times.values()), [])),
            "order": self.order,
        }


def measure_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    timer: Callable[[], float] = time.process_time,
    sync: Callable[[], None] | None = None,
) -> Interleaved:
    """Run every fn once per round for ``repeats`` timed rounds (after ``warmup`` untimed ones).

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock reading.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    names = list(fns)
    sync = sync or (lambda: None)
    for r in range(warmup):
        for name in round_order(names, r):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    order: list[str] = []
    for r in range(repeats):
        for name in round_order(names, r):
            sync()
            t0 = timer()
            fns[name]()
            sync()
            times[name].append(timer() - t0)
            order.append(name)
    return Interleaved(times=times, order=order)
