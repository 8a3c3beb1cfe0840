"""Reports: Markdown with PNG plots, and the same summary as a terminal table.

Every function takes plain data (lists of dicts, patterns, metric records) so the
report can be rebuilt from a run folder at any time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from hcomposer.pattern import parse_pattern
from hcomposer.plots import save_png, subplots
from hcomposer.primitive_specs import SPECS

__all__ = [
    "PRIMITIVE_COLORS",
    "plot_trials",
    "plot_pareto",
    "plot_pattern_strips",
    "plot_loss_curves",
    "pareto_front",
]

# Each primitive's colour is declared with its other facts in hcomposer.primitive_specs.
PRIMITIVE_COLORS = {t: s.colour for t, s in SPECS.items()}


def _colour(token: str) -> str:
    """Read live, so that a primitive registered later gets its own colour."""
    return SPECS[token].colour if token in SPECS else "#cccccc"


def plot_trials(trials: Sequence[dict], path: str | Path, title: str = "Search") -> Path:
    """Score per trial (completed trials) with the best-so-far line."""
    done = [t for t in trials if t.get("score") is not None and t.get("state") == "COMPLETE"]
    done.sort(key=lambda t: t["number"])
    fig, ax = subplots(figsize=(7, 3.6))
    xs = [t["number"] for t in done]
    ys = [t["score"] for t in done]
    ax.scatter(xs, ys, s=18, color="#555555", label="trial")
    best, run = [], -math.inf
    for y in ys:
        run = max(run, y)
        best.append(run)
    ax.step(xs, best, where="post", color="#d62728", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("proxy score (higher is better)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (maximise the first value, minimise the second)."""
    front = []
    for i, (s, c) in enumerate(points):
        dominated = any(
            (s2 >= s and c2 <= c) and (s2 > s or c2 < c)
            for j, (s2, c2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def plot_pareto(
    trials: Sequence[dict], path: str | Path, cost_key: str = "cost", cost_label: str = "cost"
) -> Path:
    """Score against cost with the Pareto front highlighted."""
    pts = [
        (t["score"], t[cost_key])
        for t in trials
        if t.get("score") is not None and t.get(cost_key) is not None
    ]
    fig, ax = subplots(figsize=(6, 4))
    if pts:
        front = sorted((pts[i] for i in pareto_front(pts)), key=lambda p: p[1])
        ax.scatter([p[1] for p in pts], [p[0] for p in pts], s=16, color="#999999", label="trial")
        ax.plot(
            [p[1] for p in front],
            [p[0] for p in front],
            "o-",
            color="#d62728",
            label="Pareto front",
        )
        ax.legend(loc="lower right")
    ax.set_xlabel(cost_label)
    ax.set_ylabel("proxy score")
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_pattern_strips(
    rows: Sequence[tuple[str, str]], path: str | Path, title: str = "Patterns"
) -> Path:
    """One coloured bar per architecture: a cell per sublayer, split for parallel groups."""
    from matplotlib.patches import Patch, Rectangle

    parsed = [(label, parse_pattern(p)) for label, p in rows]
    width = max((len(layers) for _, layers in parsed), default=1)
    fig, ax = subplots(figsize=(min(16, 2 + 0.28 * width), 0.45 * len(parsed) + 0.9))
    for r, (_, layers) in enumerate(parsed):
        y = len(parsed) - 1 - r
        for i, sub in enumerate(layers):
            h = 0.8 / len(sub)
            for j, tok in enumerate(sub):
                ax.add_patch(Rectangle((i, y + 0.1 + j * h), 0.95, h, color=_colour(tok)))
    ax.set_xlim(0, width)
    ax.set_ylim(0, len(parsed))
    ax.set_yticks([len(parsed) - 1 - r + 0.5 for r in range(len(parsed))])
    ax.set_yticklabels([label for label, _ in parsed], fontsize=8)
    ax.set_xlabel("sublayer")
    ax.set_title(title)
    used = sorted({t for _, layers in parsed for s in layers for t in s})
    ax.legend(
        handles=[Patch(color=_colour(t), label=t) for t in used if t in SPECS],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
    )
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return save_png(fig, path)


def plot_loss_curves(
    runs: dict[str, Sequence[dict]], path: str | Path, title: str = "Training loss"
) -> Path:
    """Training loss (and validation loss where logged) against tokens, one colour per run."""
    fig, ax = subplots(figsize=(7, 4))
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for (label, records), color in zip(runs.items(), colors * 4):
        tr = [(r["tokens"], r["loss"]) for r in records if r.get("loss") is not None]
        va = [(r["tokens"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        if tr:
            ax.plot(*zip(*tr), color=color, alpha=0.45, lw=1, label=f"{label} train")
        if va:
            ax.plot(*zip(*va), "o-", color=color, lw=2, ms=3, label=f"{label} val")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)
