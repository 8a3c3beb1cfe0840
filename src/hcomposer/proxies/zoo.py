"""The proxy zoo judged against a scale ruler.

Every ranker — a proxy, a fitted combination, or one of the trivial rankings a user gets for
free (parameter count, has-S/D, count of S+D, count of A) — is a score per pattern, higher
meaning "predicted better", i.e. lower loss at scale. Each is judged on the same patterns:

- Spearman and Kendall with minus the ruler's loss, each with a 95% bootstrap interval;
- the paired difference of its Spearman from the best trivial ranker's on the same patterns
  (the items resampled together; the best trivial ranker is picked on those very patterns,
  which favours the trivial side);
- its Spearman within the patterns made of A/F/W/E only, where the has-S/D rules are blind;
- its median CPU-seconds per pattern.

Design decisions (which tasks, which combination) are made on a development set of patterns
and reported on a held-out set fixed before (``benchmarks/results/ruler_v3/split.json``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hcomposer.format import markdown_table
from hcomposer.plots import save_png, subplots
from hcomposer.stats import kendall_ci, spearman, spearman_ci, spearman_diff_ci

__all__ = ["TRIVIAL", "Verdict", "letters", "afwe_only", "trivial_scores", "structure",
           "fit_ridge", "judge", "rho_against", "zoo_markdown", "plot_zoo"]  # fmt: skip

TRIVIAL = ("parameter count", "has S/D", "count of S+D", "count of A")


def letters(pattern: str) -> str:
    """The primitive letters of a pattern, groups opened: ``[A|S]F`` -> ``ASF``."""
    return re.sub(r"[\[\]|]", "", pattern)


def afwe_only(pattern: str) -> bool:
    """Made of A/F/W/E only: the patterns where the has-S/D rules cannot rank."""
    return set(letters(pattern)) <= set("AFWE")


def trivial_scores(patterns: list[str], params: Mapping[str, float]) -> dict[str, dict]:
    """The free rankings: more parameters, an S or D layer, more S+D, more A = better."""
    return {
        "parameter count": {p: float(params[p]) for p in patterns},
        "has S/D": {p: float(any(c in "SD" for c in letters(p))) for p in patterns},
        "count of S+D": {p: float(sum(c in "SD" for c in letters(p))) for p in patterns},
        "count of A": {p: float(letters(p).count("A")) for p in patterns},
    }


def structure(pattern: str, params: float) -> dict[str, float]:
    """The structural counts a fitted combination may use beside measured scores."""
    ls = letters(pattern)
    return {
        "count of S+D": float(sum(c in "SD" for c in ls)),
        "count of A": float(ls.count("A")),
        "count of W": float(ls.count("W")),
        "count of E": float(ls.count("E")),
        "log parameters": math.log(params),
    }


def _ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float):
    """Ridge on standardised columns (the scale from the fitting rows only); returns a
    predictor for new rows *without* the intercept (ranks do not need it, and a
    leave-one-out intercept, the mean of the other rows, is anti-correlated with the row left
    out: it would drag every leave-one-out Spearman down, most under a strong penalty).
    Constant columns are dropped."""
    mu, sd = x.mean(0), x.std(0)
    keep = sd > 1e-12
    z = (x[:, keep] - mu[keep]) / sd[keep]
    w = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return lambda rows: (rows[:, keep] - mu[keep]) / sd[keep] @ w, w, keep


def fit_ridge(
    features: Mapping[str, Mapping[str, float]],
    target: Mapping[str, float],
    dev: list[str],
    alphas: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
) -> tuple[dict[str, float], dict[str, Any]]:
    """A combination fitted on the development patterns only: ridge regression of minus the
    loss at scale on ``features`` (pattern -> name -> value), the penalty chosen by
    leave-one-out Spearman on ``dev``. Scores for dev patterns are their leave-one-out
    predictions (never in-sample); every other pattern is scored by the fit on all of dev.
    Written with numpy (a closed form of a few lines) rather than adding scikit-learn."""
    names = sorted({k for f in features.values() for k in f})
    pats = [p for p in features if all(k in features[p] for k in names)]
    train = [p for p in dev if p in pats and p in target]
    if len(train) < 6:
        return {}, {"reason": f"{len(train)} dev patterns with every feature (6 needed)"}
    x = {p: np.array([features[p][k] for k in names], dtype=float) for p in pats}
    xd = np.stack([x[p] for p in train])
    yd = np.array([-target[p] for p in train])

    def loo(alpha: float) -> list[float]:
        out = []
        for i in range(len(train)):
            rest = np.arange(len(train)) != i
            predict, _, _ = _ridge_fit(xd[rest], yd[rest], alpha)
            out.append(float(predict(xd[i : i + 1])[0]))
        return out

    by_alpha = {a: loo(a) for a in alphas}
    rho = {a: spearman(v, list(yd)) for a, v in by_alpha.items()}
    best = max(alphas, key=lambda a: (np.nan_to_num(rho[a], nan=-2.0), a))
    predict, w, keep = _ridge_fit(xd, yd, best)
    scores = {p: float(predict(x[p][None, :])[0]) for p in pats if p not in train}
    scores.update(zip(train, by_alpha[best], strict=True))
    kept = [k for k, m in zip(names, keep, strict=True) if m]
    info = {"features": names, "alpha": best, "dev_n": len(train),
            "loo_spearman": {str(a): rho[a] for a in alphas},
            "weights": dict(zip(kept, map(float, w), strict=True))}  # fmt: skip
    return scores, info


@dataclass
class Verdict:
    """One ranker against the ruler (intervals are 95% percentile bootstraps)."""

    name: str
    n: int
    spearman: float
    spearman_ci: tuple[float, float]
    kendall: float
    kendall_ci: tuple[float, float]
    best_trivial: str | None
    diff_best_trivial: tuple[float, float, float] | None
    afwe_n: int
    afwe_spearman: float | None
    afwe_ci: tuple[float, float] | None
    cpu_seconds: float | None
    trivial: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rho_against(
    scores: Mapping[str, float], losses: Mapping[str, float], n_boot: int = 2000
) -> tuple[float, float, float] | None:
    """Spearman of ``scores`` with minus ``losses`` (higher score, lower loss) on the patterns
    both hold, with its bootstrap interval; None below 3 patterns or for constant scores."""
    pats = sorted(set(scores) & set(losses))
    x = [scores[p] for p in pats]
    if len(pats) < 3 or len(set(x)) < 2:
        return None
    return spearman_ci(x, [-losses[p] for p in pats], n_boot=n_boot)


def judge(
    scores: Mapping[str, Mapping[str, float]],
    losses: Mapping[str, float],
    *,
    cpu: Mapping[str, float | None] | None = None,
    n_boot: int = 2000,
) -> list[Verdict]:
    """Every ranker of ``scores`` (name -> pattern -> score; the trivial ones included under
    their :data:`TRIVIAL` names) against ``losses`` (pattern -> loss at scale), on the
    patterns each ranker scores."""
    minus = {p: -v for p, v in losses.items()}
    rho_of = {name: rho_against(s, losses, n_boot) for name, s in scores.items()}
    out = []
    for name, s in scores.items():
        pats = sorted(set(s) & set(minus))
        rho = rho_of[name]
        if rho is None:
            continue
        tau = kendall_ci([s[p] for p in pats], [minus[p] for p in pats], n_boot=n_boot)
        trivial = [t for t in TRIVIAL if t in scores and rho_of.get(t) is not None]
        best = max(trivial, key=lambda t: rho_of[t][0]) if trivial else None
        diff = None
        if best is not None and best != name:
            common = sorted(set(pats) & set(scores[best]))
            diff = spearman_diff_ci([s[p] for p in common], [scores[best][p] for p in common],
                                    [minus[p] for p in common], n_boot=n_boot)  # fmt: skip
        fam = [p for p in pats if afwe_only(p)]
        within = rho_against({p: s[p] for p in fam}, losses, n_boot)
        out.append(Verdict(
            name=name, n=len(pats), spearman=rho[0], spearman_ci=(rho[1], rho[2]),
            kendall=tau[0], kendall_ci=(tau[1], tau[2]), best_trivial=best,
            diff_best_trivial=diff, afwe_n=len(fam),
            afwe_spearman=None if within is None else within[0],
            afwe_ci=None if within is None else (within[1], within[2]),
            cpu_seconds=(cpu or {}).get(name), trivial=name in TRIVIAL,
        ))  # fmt: skip
    return out


def _ci(v: float | None, ci: tuple[float, float] | None) -> str:
    if v is None or ci is None or math.isnan(v):
        return "-"
    return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def zoo_markdown(verdicts: list[Verdict]) -> str:
    """The zoo table: one row per ranker, proxies first, trivial rankers last."""
    rows = []
    for v in sorted(verdicts, key=lambda v: (v.trivial, -v.spearman)):
        d = v.diff_best_trivial
        diff = "-" if d is None else f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}] vs {v.best_trivial}"
        cpu = "free" if v.trivial else ("-" if v.cpu_seconds is None else f"{v.cpu_seconds:.0f}")
        rows.append([v.name, v.n, _ci(v.spearman, v.spearman_ci), _ci(v.kendall, v.kendall_ci),
                     diff, f"{_ci(v.afwe_spearman, v.afwe_ci)} (n {v.afwe_n})", cpu])  # fmt: skip
    header = ["ranker", "n", "Spearman", "Kendall", "Spearman minus the best trivial ranker",
              "Spearman within A/F/W/E only", "CPU-s per pattern"]  # fmt: skip
    return markdown_table(header, rows)


def plot_zoo(verdicts: list[Verdict], path: str | Path, title: str = "") -> Path:
    """Each ranker's Spearman with its interval; trivial rankers in grey."""
    order = sorted(verdicts, key=lambda v: v.spearman)
    fig, ax = subplots(figsize=(7, 0.45 * len(order) + 1.2))
    ys = range(len(order))
    xs = [v.spearman for v in order]
    err = [[v.spearman - v.spearman_ci[0] for v in order],
           [v.spearman_ci[1] - v.spearman for v in order]]  # fmt: skip
    colours = ["#999999" if v.trivial else "#1f77b4" for v in order]
    ax.barh(list(ys), xs, xerr=err, color=colours, capsize=3)
    ax.set_yticks(list(ys), [v.name for v in order], fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlim(-1, 1)
    ax.set_xlabel("Spearman with minus the loss at scale (95% bootstrap interval)")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)
