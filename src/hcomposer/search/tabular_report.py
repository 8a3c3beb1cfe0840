"""The tabular search benchmark's summaries: hit times and regret per sampler, the Markdown
report and the regret plot (the replays themselves: :mod:`hcomposer.search.tabular`)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from hcomposer.format import markdown_table
from hcomposer.plots import save_png, subplots
from hcomposer.search.tabular import Replay, Table, describe_table
from hcomposer.stats import (
    bootstrap_ci,
    bootstrap_diff_ci,
    bootstrap_mean_band,
)

__all__ = ["summarise", "markdown_report", "plot_regret", "random_expected_evals"]


def _median_hit(values: list[int | None], budget: int) -> float:
    return statistics.median(budget + 1 if v is None else v for v in values)


def _tied_hits(reps: list[Replay], budget: int) -> list[int]:
    """Evaluations to the tied set per replay, a miss counted as ``budget + 1``."""
    return [budget + 1 if r.evals_to_tied is None else r.evals_to_tied for r in reps]


def summarise(results: dict[str, list[Replay]], budget: int) -> dict[str, dict[str, Any]]:
    """Per sampler: evaluations to the top-1/top-3/tied-with-best set, misses, regret.

    Medians of hit times count a miss as ``budget + 1``; ``evals_to_tied_ci`` is a 95%
    percentile bootstrap interval of that median over replays; ``regret_ci`` the interval
    of the mean regret at each checkpoint (replays resampled whole).
    """
    out: dict[str, dict[str, Any]] = {}
    checkpoints = sorted({t for t in (4, 8, 16, 32, budget) if t <= budget})
    for name, reps in results.items():
        curves = [r.regret for r in reps]
        mean, lo, hi = bootstrap_mean_band(curves)
        tied = _tied_hits(reps, budget)
        out[name] = {
            "seeds": len(reps),
            "median_evals_to_top3": _median_hit([r.evals_to_top3 for r in reps], budget),
            "median_evals_to_top1": _median_hit([r.evals_to_top1 for r in reps], budget),
            "median_evals_to_tied": statistics.median(tied),
            "evals_to_tied_ci": list(bootstrap_ci(tied, stat=np.median)),
            # Proposals (repeats included) of the seeds that hit; a miss has no such count.
            "median_asks_to_top3_hits": (
                statistics.median(hits)
                if (hits := [r.asks_to_top3 for r in reps if r.asks_to_top3])
                else None
            ),
            "misses_top3": sum(r.evals_to_top3 is None for r in reps),
            "misses_top1": sum(r.evals_to_top1 is None for r in reps),
            "misses_tied": sum(r.evals_to_tied is None for r in reps),
            "mean_regret": {str(t): float(mean[t - 1]) for t in checkpoints},
            "regret_ci": {str(t): [float(lo[t - 1]), float(hi[t - 1])] for t in checkpoints},
        }
    if "random" in results:
        # Mean regret minus random's, with a bootstrap interval of the difference (replays
        # of two samplers are independent): the test the overlap of two intervals is not.
        # The same for the median evaluations to the tied set (a miss counts budget + 1).
        base = results["random"]
        for name, reps in results.items():
            if name != "random":
                out[name]["evals_to_tied_minus_random"] = list(
                    bootstrap_diff_ci(
                        _tied_hits(reps, budget), _tied_hits(base, budget), stat=np.median
                    )
                )
                out[name]["regret_minus_random"] = {
                    str(t): list(
                        bootstrap_diff_ci([r.regret[t - 1] for r in reps],
                                          [r.regret[t - 1] for r in base])
                    )
                    for t in checkpoints
                }  # fmt: skip
    return out


def _fmt_hit(v: float, budget: int) -> str:
    return f">{budget}" if v > budget else f"{v:g}"


def random_expected_evals(n: int, k: int) -> float:
    """Mean evaluations random sampling without repeats needs to meet one of ``k`` in ``n``.

    The first of ``k`` marked items in a random order of ``n`` sits at position
    ``(n + 1) / (k + 1)`` on average (the ``k`` items cut the order into ``k + 1`` gaps of
    equal mean length)."""
    if not 1 <= k <= n:
        raise ValueError("need 1 <= k <= n")
    return (n + 1) / (k + 1)


def _against_random(lo: float, hi: float, below: str, above: str) -> str:
    """How a difference from random reads, given its interval [lo, hi]."""
    if lo <= 0 <= hi:
        return "the interval holds zero, so the difference is inside the noise."
    return below if hi < 0 else above


def markdown_report(
    table: Table, summary: dict[str, dict[str, Any]], budget: int, command: str
) -> str:
    """The sampler comparison as Markdown (the table lives next to the regret plot)."""

    ranked = table.ranked
    checkpoints = list(next(iter(summary.values()))["mean_regret"]) if summary else []
    tied = table.tied()
    rows = []
    for name, s in summary.items():
        lo, hi = s["evals_to_tied_ci"]
        rows.append(
            [
                name,
                s["seeds"],
                f"{_fmt_hit(s['median_evals_to_tied'], budget)} "
                f"[{_fmt_hit(lo, budget)}, {_fmt_hit(hi, budget)}]",
                s["misses_tied"],
                _fmt_hit(s["median_evals_to_top3"], budget),
                _fmt_hit(s["median_evals_to_top1"], budget),
                *[
                    f"{s['mean_regret'][t]:.3g} [{s['regret_ci'][t][0]:.3g}, "
                    f"{s['regret_ci'][t][1]:.3g}]"
                    for t in checkpoints
                ],
            ]
        )
    header = [
        "sampler",
        "replays",
        "evals to tied-with-best (median [95% CI])",
        "missed tied",
        "evals to top-3 (median)",
        "evals to top-1 (median)",
        *[f"regret @{t} (mean [95% CI])" for t in checkpoints],
    ]
    noisy = len(table.seeds) > 1
    lines = [
        f"# Tabular search benchmark: {table.name}",
        "",
        f"`{command}`",
        "",
        f"{len(table.scores)} patterns; best {ranked[0][0]} ({ranked[0][1]:.4g}), "
        f"{len(tied)} tied with it ({', '.join(sorted(tied))}); worst {ranked[-1][0]} "
        f"({ranked[-1][1]:.4g}). Budget {budget} evaluations per replay.",
        "",
        markdown_table(header, rows),
        "",
        "Evals count distinct patterns evaluated (what `search --trials` counts; a repeated "
        "proposal is answered from the log). A replay that misses within the budget counts "
        f"as {budget + 1}. Regret after e evaluations is the best mean score in the table minus "
        "the mean score of the pattern the search would pick then (its best observed one). "
        + (
            f"Noisy replays: each evaluation is told one of the table's {len(table.seeds)} "
            "seeds' scores, drawn at random, as a real search meets seed noise."
            if noisy
            else "One seed per pattern: no noise model, and the tied set is the top-1."
        ),
    ]
    expected = random_expected_evals(len(ranked), len(tied))
    lines.append(
        f"- Random sampling without repeats needs {expected:.1f} "
        f"evaluations on average to meet one of the {len(tied)} tied patterns among "
        f"{len(ranked)} ((N + 1) / (k + 1)); with a large tied set that is little, and the "
        "model-based samplers spend their first trials on random start-up."
    )
    if "random" in summary:
        base = summary["random"]
        for name in [n for n in summary if n != "random"]:
            s = summary[name]
            for t, (diff, lo, hi) in s.get("regret_minus_random", {}).items():
                if int(t) < 16 and int(t) != budget:
                    continue
                lines.append(
                    f"- {name}: regret after {t} evaluations minus random's: {diff:+.3g} "
                    f"[{lo:+.3g}, {hi:+.3g}]; "
                    + _against_random(lo, hi, "lower than random's.", "higher than random's.")
                )
            ratio = s["median_evals_to_tied"] / base["median_evals_to_tied"]
            diff, lo, hi = s["evals_to_tied_minus_random"]
            lines.append(
                f"- {name}: {ratio:.2f}x the evaluations of random to reach the tied-with-best "
                f"set; median minus random's {diff:+g} [{lo:+g}, {hi:+g}]: "
                + _against_random(lo, hi, "fewer than random.", "more than random.")
            )
    lines += ["", *_structure_lines(table)]
    return "\n".join(lines) + "\n"


def _structure_lines(table: Table) -> list[str]:
    """The table's own structure: extremes, score by primitive count and by position."""

    d = describe_table(table)
    out = [
        "## Table structure",
        "",
        f"Mean score {d['mean']:.4g}, spread (std) {d['stdev']:.4g}. "
        f"Best: {', '.join(f'{p} {v:.4g}' for p, v in d['best'])}. "
        f"Worst: {', '.join(f'{p} {v:.4g}' for p, v in d['worst'])}.",
        "",
    ]
    first = table.choices[0]
    counts = d["mean_by_count"][first]
    out += [
        f"Mean score by number of {first}:",
        "",
        markdown_table([f"# {first}", *map(str, counts)], [["score", *counts.values()]]),
        "",
        "Mean score with a choice at a position, minus the table mean:",
        "",
        markdown_table(
            ["choice", *[f"pos {i + 1}" for i in range(table.positions)]],
            [[c, *v] for c, v in d["position_effect"].items()],
        ),
    ]
    if d.get("seed_spearman"):
        rho = ", ".join(f"{k}: {v:.3f}" for k, v in d["seed_spearman"].items())
        out += [
            "",
            f"Spearman rank correlation between seeds: {rho}. Noise floor (median per-pattern "
            f"seed std): {d['noise_floor']:.4g}; a pattern within {d['tie_margin']:.4g} of the "
            f"best mean is tied with it ({len(d['tied_with_best'])} patterns).",
        ]
    if "spearman_score_params" in d:
        out += [
            "",
            "Spearman correlation of score with parameter count: "
            f"{d['spearman_score_params']:.3f}.",
        ]
    return out


def plot_regret(
    results: dict[str, list[Replay]], table: Table, budget: int, path: str | Path
) -> Path:
    """Mean simple regret (95% bootstrap band) and the share of replays at the tied set."""
    fig, (ax1, ax2) = subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(1, budget + 1)
    for name, reps in results.items():
        mean, lo, hi = bootstrap_mean_band([r.regret for r in reps])
        (line,) = ax1.plot(x, mean, label=name)
        ax1.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
        hit = np.array([r.evals_to_tied or budget + 1 for r in reps])
        ax2.step(x, [(hit <= t).mean() for t in x], where="post", label=name)
    ax1.set_xlabel("evaluations (distinct patterns)")
    ax1.set_ylabel("simple regret (mean, 95% bootstrap band)")
    ax1.set_title(f"{table.name}: regret")
    ax2.set_xlabel("evaluations (distinct patterns)")
    ax2.set_ylabel("share of replays that evaluated a tied-with-best pattern")
    ax2.set_title(f"{table.name}: time to the tied set")
    ax2.set_ylim(0, 1.02)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_png(fig, path)
