"""IsoFLOP fits: a parabola of loss against log size per budget, power laws across budgets.

For each compute budget C the final losses of models of several sizes N (all trained with
C FLOPs) are fitted by ``loss = a x^2 + b x + c`` with ``x = ln N`` (Chinchilla's approach 2,
Hoffmann et al. 2022). Its vertex ``x* = -b / 2a`` is the budget's compute-optimal size
``N* = exp(x*)`` and ``c - b^2 / 4a`` the loss there. The optimal token count ``D*`` is read
from the same runs: ``ln D`` is (almost exactly) linear in ``ln N`` at one budget, so a line
through the budget's runs is evaluated at ``x*``.

Across the budgets whose minimum lies inside the sizes trained, ``ln N* = a ln C + b``
(ordinary least squares) gives the exponent of ``N* ∝ C^a``; the same for ``D*`` and, on the
loss, both ``L* = s log10 C + k`` (the slope of the frontier in nats per decade of compute)
and ``ln L* = e ln C + k`` (its log-log exponent).

Two intervals are reported for every slope:

- ``ols``: the regression's standard error and the two-sided 95% Student-t interval with
  ``n - 2`` degrees of freedom. It sees only the scatter of the optima about the line, so with
  three budgets (one degree of freedom, t = 12.7) it is very wide, and with two it is undefined.
- ``bootstrap``: percentile 95% interval over resampled runs. Each draw resamples, within
  every budget, that budget's runs with replacement, refits every parabola and the frontier;
  draws in which a budget has fewer than three distinct sizes or no minimum are discarded and
  counted (a draw's vertex may leave the sizes: that is part of the uncertainty). It carries
  the noise of the individual runs into the slope.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "Parabola",
    "PowerLaw",
    "BudgetFit",
    "Frontier",
    "fit_parabola",
    "fit_power_law",
    "fit_budget",
    "fit_frontier",
]


@dataclass(frozen=True)
class Parabola:
    """``y = a x^2 + b x + c``; the vertex exists (a minimum) when ``a > 0``."""

    a: float
    b: float
    c: float

    @property
    def has_minimum(self) -> bool:
        return self.a > 0

    @property
    def vertex_x(self) -> float:
        return -self.b / (2 * self.a) if self.a != 0 else math.nan

    @property
    def vertex_y(self) -> float:
        return self.c - self.b**2 / (4 * self.a) if self.a != 0 else math.nan

    def __call__(self, x):
        return self.a * np.asarray(x) ** 2 + self.b * np.asarray(x) + self.c


def fit_parabola(x: Sequence[float], y: Sequence[float]) -> Parabola:
    """Least-squares parabola through ``(x, y)``; needs three distinct ``x``."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(np.unique(x)) < 3:
        raise ValueError("a parabola needs at least three distinct x values")
    # Centre x first: ln N spans a few units around ~12, and the raw Vandermonde matrix would
    # lose digits the vertex needs.
    m = float(x.mean())
    a, b, c = np.polyfit(x - m, y, 2)
    return Parabola(float(a), float(b - 2 * a * m), float(c - b * m + a * m * m))


@dataclass(frozen=True)
class PowerLaw:
    """``y = slope * x + intercept`` (on whatever scale the caller took) with intervals."""

    slope: float
    intercept: float
    n: int
    stderr: float
    ols_low: float
    ols_high: float
    boot_low: float = math.nan
    boot_high: float = math.nan
    boot_draws: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """OLS line with the slope's standard error and a 95% t-interval (NaN/inf below 3 points)."""
    from scipy.stats import t as student_t

    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 2 or len(np.unique(x)) < 2:
        raise ValueError("a line needs at least two distinct x values")
    xm = x.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - slope * xm)
    if n < 3:
        return PowerLaw(slope, intercept, n, math.nan, -math.inf, math.inf)
    resid = y - (slope * x + intercept)
    stderr = math.sqrt(float((resid**2).sum()) / (n - 2) / sxx)
    half = float(student_t.ppf(0.975, n - 2)) * stderr
    return PowerLaw(slope, intercept, n, stderr, slope - half, slope + half)


@dataclass(frozen=True)
class BudgetFit:
    """One budget's parabola and optimum. ``inside`` is False when the vertex lies outside the
    sizes trained (an extrapolated optimum: widen the sizes around it)."""

    budget: float
    n_runs: int
    parabola: Parabola | None
    n_opt: float
    d_opt: float
    loss_opt: float
    inside: bool
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.parabola is not None and self.parabola.has_minimum

    def to_dict(self) -> dict:
        p = self.parabola
        return {
            "budget": self.budget,
            "n_runs": self.n_runs,
            "parabola": None if p is None else {"a": p.a, "b": p.b, "c": p.c, "x": "ln N"},
            "n_opt": self.n_opt,
            "d_opt": self.d_opt,
            "loss_opt": self.loss_opt,
            "inside": self.inside,
            "ok": self.ok,
            "note": self.note,
        }


def fit_budget(
    budget: float, params: Sequence[float], tokens: Sequence[float], losses: Sequence[float]
) -> BudgetFit:
    """The parabola of loss against ln N for one budget, its optimum N*, D* and loss."""
    x = np.log(np.asarray(params, float))
    n = len(x)
    try:
        p = fit_parabola(x, losses)
    except ValueError as e:
        return BudgetFit(budget, n, None, math.nan, math.nan, math.nan, False, str(e))
    if not p.has_minimum:
        note = "no minimum"
        return BudgetFit(budget, n, p, math.nan, math.nan, math.nan, False, note)
    xs = p.vertex_x
    ln_d = np.polyfit(x, np.log(np.asarray(tokens, float)), 1)
    inside = bool(x.min() <= xs <= x.max())
    note = "" if inside else "vertex outside the sizes"
    return BudgetFit(
        budget, n, p, math.exp(xs), math.exp(np.polyval(ln_d, xs)), p.vertex_y, inside, note
    )


@dataclass(frozen=True)
class Frontier:
    """The compute-optimal frontier across budgets: exponents and slopes with intervals."""

    budgets: list[BudgetFit]
    n_exponent: PowerLaw | None  # ln N* against ln C
    d_exponent: PowerLaw | None  # ln D* against ln C
    loss_slope: PowerLaw | None  # L* against log10 C (nats per decade)
    loss_exponent: PowerLaw | None  # ln L* against ln C
    boot_failed: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        def pl(v):
            return None if v is None else v.to_dict()

        return {
            "budgets": [b.to_dict() for b in self.budgets],
            "n_exponent": pl(self.n_exponent),
            "d_exponent": pl(self.d_exponent),
            "loss_slope": pl(self.loss_slope),
            "loss_exponent": pl(self.loss_exponent),
            "boot_failed": self.boot_failed,
            "note": self.note,
        }


def _frontier_lines(fits: Sequence[BudgetFit]) -> tuple[float, float, float, float]:
    c = np.log([f.budget for f in fits])
    slope = lambda y: float(np.polyfit(c, y, 1)[0])  # noqa: E731
    return (
        slope(np.log([f.n_opt for f in fits])),
        slope(np.log([f.d_opt for f in fits])),
        slope([f.loss_opt for f in fits]) * math.log(10),
        slope(np.log([f.loss_opt for f in fits])),
    )


def fit_frontier(runs: Sequence[dict], *, bootstrap: int = 1000, seed: int = 0) -> Frontier:
    """Fit every budget of ``runs`` (dicts with ``budget``, ``params``, ``tokens``, ``loss``)
    and the frontier through the budgets whose parabola has a minimum."""
    by_budget: dict[float, list[dict]] = {}
    for r in runs:
        by_budget.setdefault(float(r["budget"]), []).append(r)
    budgets = sorted(by_budget)

    def fit_all(groups: dict[float, list[dict]]) -> list[BudgetFit]:
        return [
            fit_budget(
                c,
                [r["params"] for r in groups[c]],
                [r["tokens"] for r in groups[c]],
                [r["loss"] for r in groups[c]],
            )
            for c in budgets
        ]

    fits = fit_all(by_budget)
    # Only optima bracketed by the sizes trained: a vertex outside them is an extrapolation of
    # a parabola that was never meant to hold there.
    good = [f for f in fits if f.ok and f.inside]
    if len(good) < 2:
        note = (
            f"{len(good)} budget(s) with a minimum inside the sizes trained: a frontier needs "
            "at least two"
        )
        return Frontier(fits, None, None, None, None, note=note)
    lnc = np.log([f.budget for f in good])
    n_exp = fit_power_law(lnc, np.log([f.n_opt for f in good]))
    d_exp = fit_power_law(lnc, np.log([f.d_opt for f in good]))
    l_slope = fit_power_law(lnc / math.log(10), [f.loss_opt for f in good])
    l_exp = fit_power_law(lnc, np.log([f.loss_opt for f in good]))

    rng = np.random.default_rng(seed)
    draws, failed = [], 0
    for _ in range(bootstrap):
        sample = {
            c: [rs[i] for i in rng.integers(0, len(rs), len(rs))] for c, rs in by_budget.items()
        }
        bf = fit_all(sample)
        # The same budgets as the point estimate, so every draw estimates the same slope.
        chosen = [b for b, f in zip(bf, fits) if f.ok and f.inside]
        if not all(b.ok for b in chosen):
            failed += 1
            continue
        draws.append(_frontier_lines(chosen))
    note = ""
    if draws:
        lo, hi = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
        n_exp, d_exp, l_slope, l_exp = (
            PowerLaw(
                **{
                    **asdict(v),
                    "boot_low": float(lo[i]),
                    "boot_high": float(hi[i]),
                    "boot_draws": len(draws),
                }
            )
            for i, v in enumerate((n_exp, d_exp, l_slope, l_exp))
        )
    elif bootstrap:
        note = "every bootstrap draw lost a budget's minimum: no bootstrap interval"
    return Frontier(fits, n_exp, d_exp, l_slope, l_exp, boot_failed=failed, note=note)
