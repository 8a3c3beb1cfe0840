"""IsoFLOP plots from a sweep's results (plain dicts, so they can be redrawn from results.json).

- ``isoflop.png``: one panel per pattern; final loss against parameters (log axis), one
  colour per budget, the fitted parabola in ln N and its minimum (a star; none when the
  parabola has no minimum or it lies outside the sizes trained).
- ``frontier.png``: the optima against compute: N* (log-log) with each pattern's fitted
  power law, and the loss at the optimum against compute with its fitted line.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hcomposer.plots import save_png, subplots

__all__ = ["plot_isoflop", "plot_frontier"]

_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def plot_isoflop(results: dict, path: str | Path) -> Path:
    """Loss against parameters per budget, with the fitted parabolas and their minima."""
    from matplotlib.ticker import NullFormatter

    patterns = list(results["patterns"])
    fig, axes = subplots(
        1, len(patterns), figsize=(5.2 * len(patterns), 4), squeeze=False, sharey=True
    )
    budgets = sorted({r["budget"] for r in results["runs"]})
    color = {b: _COLORS[i % len(_COLORS)] for i, b in enumerate(budgets)}
    for ax, block in zip(axes[0], patterns):
        fits = {f["budget"]: f for f in results["patterns"][block]["budgets"]}
        for b in budgets:
            rows = [
                r
                for r in results["runs"]
                if r["pattern"] == block and r["budget"] == b and r["loss"] is not None
            ]
            if not rows:
                continue
            n = np.array([r["params"] for r in rows], float)
            ax.scatter(n, [r["loss"] for r in rows], color=color[b], s=20, label=f"C={b:.2g}")
            fit = fits.get(b)
            if fit and fit["parabola"]:
                p = fit["parabola"]
                x = np.linspace(math.log(n.min()) - 0.15, math.log(n.max()) + 0.15, 60)
                ax.plot(np.exp(x), p["a"] * x**2 + p["b"] * x + p["c"], color=color[b], lw=1)
            if fit and fit["ok"] and fit["inside"]:
                ax.scatter(
                    [fit["n_opt"]],
                    [fit["loss_opt"]],
                    marker="*",
                    s=140,
                    facecolor=color[b],
                    edgecolor="black",
                    zorder=3,
                )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("parameters N")
        ax.set_title(f"{block}: IsoFLOP curves")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final validation loss (nats/token)")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    return save_png(fig, Path(path))


def plot_frontier(results: dict, path: str | Path) -> Path:
    """N* and L* against compute, with the fitted frontier of every pattern."""
    fig, (ax_n, ax_l) = subplots(1, 2, figsize=(10.5, 4))
    for i, (block, res) in enumerate(results["patterns"].items()):
        c = _COLORS[i % len(_COLORS)]
        good = [f for f in res["budgets"] if f["ok"] and f["inside"]]
        if not good:
            continue
        cs = np.array([f["budget"] for f in good])
        ax_n.scatter(cs, [f["n_opt"] for f in good], color=c)
        ax_l.scatter(cs, [f["loss_opt"] for f in good], color=c)
        grid = np.geomspace(cs.min(), cs.max(), 20)
        if res["n_exponent"]:
            e = res["n_exponent"]
            ax_n.plot(
                grid,
                np.exp(e["intercept"]) * grid ** e["slope"],
                color=c,
                label=f"{block}: N* ∝ C^{e['slope']:.2f}",
            )
        if res["loss_slope"]:
            s = res["loss_slope"]
            ax_l.plot(
                grid,
                s["intercept"] + s["slope"] * np.log10(grid),
                color=c,
                label=f"{block}: {s['slope']:.3f} per decade",
            )
    for ax, label in ((ax_n, "optimal parameters N*"), (ax_l, "loss at the optimum L*")):
        ax.set_xscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_n.set_yscale("log")
    ax_n.set_title("compute-optimal size")
    ax_l.set_title("compute-optimal loss")
    return save_png(fig, Path(path))
