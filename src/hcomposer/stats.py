"""Small statistics for evidence: bootstrap intervals, seed noise, ties with the best.

Every claim hcomposer makes about architectures (A beats B, the search beats random, the
proxy ranks like scale) is reported with an interval from these functions. They take plain
sequences and return plain floats, so the tests can check them against hand-worked numbers.

Conventions:

- bootstrap intervals are percentile intervals of ``n_boot`` resamples drawn with a fixed
  seed, so a report is reproducible;
- seed noise of one pattern is its sample standard deviation over seeds (``ddof=1``); the
  *noise floor* of a table is the median of those over its patterns;
- a pattern is *tied with the best* when its mean is not below the best mean by more than a
  one-sided z test allows, with the within-pattern variance pooled over the whole table
  (three seeds per pattern give too rough a variance each; the pooled one has hundreds of
  degrees of freedom, so the normal quantile is the right one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats

__all__ = [
    "bootstrap_ci",
    "bootstrap_diff_ci",
    "bootstrap_mean_band",
    "spearman",
    "spearman_ci",
    "spearman_diff_ci",
    "kendall",
    "kendall_ci",
    "seed_std",
    "noise_floor",
    "pooled_seed_std",
    "tied_with_best",
    "separated",
    "pair_agreement",
]


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable[..., float] = np.mean,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over ``values`` (scipy's ``bootstrap``)."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        v = float(stat(x)) if x.size else math.nan
        return v, v
    return _percentile_bootstrap((x,), stat, n_boot, level, seed)


def _percentile_bootstrap(samples, stat, n_boot, level, seed, **options) -> tuple[float, float]:
    """scipy's percentile bootstrap interval of ``stat`` over ``samples``."""
    res = scipy.stats.bootstrap(
        samples,
        stat,
        n_resamples=n_boot,
        confidence_level=level,
        method="percentile",
        vectorized=False,
        rng=np.random.default_rng(seed),
        **options,
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def bootstrap_diff_ci(
    a: Sequence[float],
    b: Sequence[float],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    stat: Callable[[np.ndarray], float] = np.mean,
) -> tuple[float, float, float]:
    """``stat(a) - stat(b)`` (default the mean) of two independent samples with its percentile
    bootstrap interval (each sample resampled on its own; scipy's ``bootstrap``, unpaired)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(stat(x) - stat(y))
    if x.size < 2 or y.size < 2:
        return diff, diff, diff
    lo, hi = _percentile_bootstrap(
        (x, y), lambda u, v: stat(u) - stat(v), n_boot, level, seed, paired=False
    )
    return diff, lo, hi


def bootstrap_mean_band(
    curves: Sequence[Sequence[float]] | np.ndarray,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean curve over replays (rows) with a pointwise percentile bootstrap band.

    Rows are resampled whole, so the band at each step is the interval of the mean over
    replays; returns ``(mean, lo, hi)``, each of the curves' length.
    """
    c = np.asarray(curves, dtype=float)
    if c.ndim != 2 or c.shape[0] == 0:
        raise ValueError("bootstrap_mean_band needs a 2-D array with at least one row")
    mean = c.mean(axis=0)
    if c.shape[0] < 2:
        return mean, mean.copy(), mean.copy()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, c.shape[0], size=(n_boot, c.shape[0]))
    boots = c[idx].mean(axis=1)  # [n_boot, T]: the mean curve of each resample of rows
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha], axis=0)
    return mean, lo, hi


def _rank_correlation(name: str, fn, x: Sequence[float], y: Sequence[float]) -> float:
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.size != b.size or a.size < 2:
        raise ValueError(f"{name} needs two sequences of the same length, at least 2")
    if np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan
    return float(fn(a, b).statistic)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get average ranks); NaN if a side is constant."""
    return _rank_correlation("spearman", scipy.stats.spearmanr, x, y)


def spearman_ci(
    x: Sequence[float], y: Sequence[float], **bootstrap: Any
) -> tuple[float, float, float]:
    """Spearman's rho with a percentile bootstrap interval over resampled pairs (keywords
    ``n_boot=2000``, ``level=0.95``, ``seed=0``).

    Resamples in which one side is constant have no rho and are dropped.
    """
    return _paired_ci(spearman, x, y, **bootstrap)


def _paired_ci(
    stat, x, y, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``stat(x, y)`` and its percentile interval over resampled (x, y) pairs."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    value = stat(a, b)
    lo, hi = _resampled_interval(a.size, lambda i: stat(a[i], b[i]), n_boot, level, seed)
    return value, lo, hi


def kendall(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties handled); NaN if a side is constant."""
    return _rank_correlation("kendall", scipy.stats.kendalltau, x, y)


def kendall_ci(
    x: Sequence[float], y: Sequence[float], **bootstrap: Any
) -> tuple[float, float, float]:
    """Kendall's tau with a percentile bootstrap interval over resampled pairs (the keywords
    of :func:`spearman_ci`)."""
    return _paired_ci(kendall, x, y, **bootstrap)


def spearman_diff_ci(
    x1: Sequence[float],
    x2: Sequence[float],
    y: Sequence[float],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``rho(x1, y) - rho(x2, y)``: two scores of the same items against one outcome, with a
    paired percentile bootstrap interval (the items are resampled together for both)."""
    a1, a2, b = (np.asarray(v, dtype=float) for v in (x1, x2, y))
    if not a1.size == a2.size == b.size:
        raise ValueError("spearman_diff_ci needs three sequences of the same length")
    diff = spearman(a1, b) - spearman(a2, b)
    lo, hi = _resampled_interval(
        b.size, lambda i: spearman(a1[i], b[i]) - spearman(a2[i], b[i]), n_boot, level, seed
    )
    return diff, lo, hi


def _resampled_interval(
    n: int, stat: Callable[[np.ndarray], float], n_boot: int, level: float, seed: int
) -> tuple[float, float]:
    """Percentile interval of ``stat(indices)`` over ``n_boot`` resamples of ``range(n)``
    with replacement; resamples where ``stat`` is NaN (a constant side) are dropped."""
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        r = stat(rng.integers(0, n, size=n))
        if not math.isnan(r):
            boots.append(r)
    if not boots:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def seed_std(values: Sequence[float]) -> float:
    """Sample standard deviation over seeds (ddof=1); 0 for a single seed."""
    x = np.asarray(values, dtype=float)
    return float(x.std(ddof=1)) if x.size > 1 else 0.0


def noise_floor(per_seed: Mapping[str, Sequence[float]]) -> float:
    """Median over patterns of each pattern's seed standard deviation."""
    stds = [seed_std(v) for v in per_seed.values() if len(v) > 1]
    return float(np.median(stds)) if stds else math.nan


def pooled_seed_std(per_seed: Mapping[str, Sequence[float]]) -> float:
    """Within-pattern standard deviation pooled over patterns (weights = degrees of freedom)."""
    ss, dof = 0.0, 0
    for v in per_seed.values():
        x = np.asarray(v, dtype=float)
        if x.size > 1:
            ss += float(((x - x.mean()) ** 2).sum())
            dof += x.size - 1
    return math.sqrt(ss / dof) if dof else math.nan


def tied_with_best(
    per_seed: Mapping[str, Sequence[float]], level: float = 0.95
) -> tuple[frozenset[str], dict[str, float]]:
    """Patterns whose mean is statistically tied with the best mean.

    Pattern p (n_p seeds, mean m_p) is tied with the best b when
    ``m_b - m_p <= z * s * sqrt(1/n_b + 1/n_p)``: a one-sided z test at ``level`` with the
    pooled within-pattern standard deviation ``s``. With one seed per pattern there is no
    noise estimate and only the best itself (and exact ties) count. Returns the set and the
    margin each pattern would need (the right-hand side), for reports.
    """
    means = {p: float(np.mean(v)) for p, v in per_seed.items()}
    best = max(means, key=lambda p: (means[p], p))
    s = pooled_seed_std(per_seed)
    z = float(scipy.stats.norm.ppf(level))
    margins: dict[str, float] = {}
    tied = set()
    nb = len(per_seed[best])
    for p, m in means.items():
        margin = 0.0 if math.isnan(s) else z * s * math.sqrt(1 / nb + 1 / len(per_seed[p]))
        margins[p] = margin
        if means[best] - m <= margin + 1e-12:
            tied.add(p)
    return frozenset(tied), margins


def separated(
    per_seed: Mapping[str, Sequence[float]], a: str, b: str, s: float, dof: int, level: float
) -> bool:
    """Whether the means of ``a`` and ``b`` differ beyond a two-sided t test at ``level``,
    with the pooled within-pattern standard deviation ``s`` on ``dof`` degrees of freedom."""
    if math.isnan(s) or dof < 1:
        return False
    t = float(scipy.stats.t.ppf(0.5 + level / 2, dof))
    na, nb = len(per_seed[a]), len(per_seed[b])
    gap = abs(float(np.mean(per_seed[a])) - float(np.mean(per_seed[b])))
    return gap > t * s * math.sqrt(1 / na + 1 / nb)


def _dof(per_seed: Mapping[str, Sequence[float]]) -> int:
    return sum(len(v) - 1 for v in per_seed.values() if len(v) > 1)


def pair_agreement(
    proxy: Mapping[str, Sequence[float]],
    scale: Mapping[str, Sequence[float]],
    level: float = 0.95,
) -> dict:
    """Do the scale runs order the pairs that the proxy separates the same way?

    ``proxy`` maps each pattern to its proxy scores per seed (higher is better), ``scale`` to
    its validation losses per seed (lower is better). A pair is *separated* by one side when
    its means differ beyond that side's pooled seed noise (``separated``; the scale side's
    noise comes from the patterns trained on more than one seed). Returns the number of
    pairs, how many the proxy separates, how many both separate, how many of each set the
    scale runs order as the proxy does (*concordant*), and the discordant pairs. A rank
    correlation counts every pair, including those inside the proxy's noise, whose order is a
    coin flip; this counts only the orders the proxy claims.
    """
    pats = sorted(set(proxy) & set(scale))
    sp, dp = pooled_seed_std({p: proxy[p] for p in pats}), _dof({p: proxy[p] for p in pats})
    ss, ds = pooled_seed_std({p: scale[p] for p in pats}), _dof({p: scale[p] for p in pats})
    out = {"pairs": 0, "proxy_separated": 0, "proxy_concordant": 0, "both_separated": 0,
           "both_concordant": 0, "discordant": [], "proxy_std": sp, "proxy_dof": dp,
           "scale_std": ss, "scale_dof": ds, "level": level}  # fmt: skip
    for i, a in enumerate(pats):
        for b in pats[i + 1 :]:
            out["pairs"] += 1
            if not separated(proxy, a, b, sp, dp, level):
                continue
            hi, lo = (a, b) if np.mean(proxy[a]) > np.mean(proxy[b]) else (b, a)
            agree = float(np.mean(scale[hi])) < float(np.mean(scale[lo]))
            out["proxy_separated"] += 1
            out["proxy_concordant"] += agree
            if not agree:
                out["discordant"].append([hi, lo])
            if separated(scale, a, b, ss, ds, level):
                out["both_separated"] += 1
                out["both_concordant"] += agree
    return out
