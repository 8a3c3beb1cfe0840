"""Proxy-to-scale validity: does the proxy rank architectures as training at scale does?

Recipe (``run_proxy_rank``):
1. score a pool of patterns with the proxy (at the proxy shape);
2. keep ``k`` of them spread evenly across the proxy's score range (sorted by
   score, evenly spaced ranks, both ends included), so the test is not decided
   by a cluster of near-equal candidates;
3. extrapolate each kept pattern to ``scale_layers`` sublayers (``stack``) at the
   larger ``scale_shape`` and train it on text for ``train_config.tokens``;
4. report Spearman's rho (scipy) between proxy scores and minus the validation
   loss at scale (both "higher is better"), Kendall's tau, and a scatter plot.

Every step appends to a JSON-lines log in ``out_dir``, so a killed run resumes
where it stopped; ``result.json``, ``result.md`` and ``proxy_rank.png`` are
written atomically at the end.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hcomposer.architecture import Architecture
from hcomposer.errors import UserError
from hcomposer.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from hcomposer.proxies.proxy import evaluate_proxy
from hcomposer.reporting.plots import pyplot, save_png
from hcomposer.scaling.extrapolate import stack
from hcomposer.training.trainer import TrainConfig, train

__all__ = ["select_across_range", "rank_correlation", "run_proxy_rank", "plot_proxy_rank"]


def select_across_range(scored: list[tuple[str, float]], k: int) -> list[tuple[str, float]]:
    """``k`` items evenly spaced in score rank (lowest and highest included)."""
    ranked = sorted(scored, key=lambda p: (p[1], p[0]))
    if k >= len(ranked):
        return ranked
    if k == 1:
        return [ranked[-1]]
    idx = sorted({round(i * (len(ranked) - 1) / (k - 1)) for i in range(k)})
    return [ranked[i] for i in idx]


def rank_correlation(proxy_scores: list[float], scale_losses: list[float]) -> dict[str, float]:
    """Spearman rho and Kendall tau between proxy scores and minus the losses at scale."""
    from scipy import stats

    if len(proxy_scores) != len(scale_losses) or len(proxy_scores) < 3:
        raise UserError("rank correlation needs at least 3 (score, loss) pairs")
    neg = [-v for v in scale_losses]
    rho, p_rho = stats.spearmanr(proxy_scores, neg)
    tau, p_tau = stats.kendalltau(proxy_scores, neg)
    return {
        "spearman": float(rho),
        "spearman_p": float(p_rho),
        "kendall": float(tau),
        "kendall_p": float(p_tau),
        "n": len(proxy_scores),
    }


def plot_proxy_rank(points: list[dict[str, Any]], corr: dict[str, float], path, proxy: str):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs = [p["proxy_score"] for p in points]
    ys = [p["scale_val_loss"] for p in points]
    ax.scatter(xs, ys)
    for p in points:
        ax.annotate(p["pattern"], (p["proxy_score"], p["scale_val_loss"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel(f"proxy score ({proxy}, higher is better)")
    ax.set_ylabel("validation loss at scale")
    ax.set_title(f"Spearman rho = {corr['spearman']:.2f}, Kendall tau = {corr['kendall']:.2f}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def run_proxy_rank(
    patterns: list[str],
    out_dir: str | Path,
    *,
    k: int = 8,
    proxy: str = "mad",
    proxy_shape: str = "proxy",
    proxy_config=None,
    scale_shape: Any = "10m",
    scale_layers: int = 12,
    train_config=None,
    seed: int = 0,
    log=print,
) -> dict[str, Any]:
    """The recipe in the module docstring; returns the result dict (also written to out_dir)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_config = train_config or TrainConfig(tokens=500_000, seq_len=128, batch_size=8)
    t0 = time.perf_counter()
    proxy_log = out / "proxy_scores.jsonl"
    done = {r["pattern"]: r for r in read_jsonl(proxy_log)}
    scored = []
    for pat in patterns:
        arch = Architecture.parse(pat, proxy_shape)
        if arch.pattern not in done:
            res = evaluate_proxy(arch, proxy, seed=seed, config=proxy_config)
            rec = {"pattern": arch.pattern, "score": res.score, "wall_seconds": res.wall_seconds,
                   "tasks": res.tasks}  # fmt: skip
            append_jsonl(proxy_log, rec)
            done[arch.pattern] = rec
            log(f"proxy {arch.pattern}: {res.score:.4f} ({res.wall_seconds:.0f}s)")
        scored.append((arch.pattern, done[arch.pattern]["score"]))
    chosen = select_across_range(scored, k)
    scale_log = out / "scale_losses.jsonl"
    trained = {r["pattern"]: r for r in read_jsonl(scale_log)}
    points = []
    for pat, score in chosen:
        big = Architecture.parse(stack(pat, scale_layers), scale_shape)
        if pat not in trained:
            run_dir = out / "runs" / pat.replace("|", "_").replace("[", "(").replace("]", ")")
            res = train(big, train_config, run_dir, resume=run_dir.exists(), progress=False)
            rec = {
                "pattern": pat, "scale_pattern": big.pattern, "val_loss": res.val_loss,
                "status": res.status, "params": res.params_total,
                "wall_seconds": res.wall_seconds, "tokens_per_s": res.tokens_per_second,
            }  # fmt: skip
            append_jsonl(scale_log, rec)
            trained[pat] = rec
            log(f"scale {big.pattern}: val_loss {res.val_loss} ({res.wall_seconds:.0f}s)")
        r = trained[pat]
        points.append({"pattern": pat, "proxy_score": score, "scale_pattern": r["scale_pattern"],
                       "scale_val_loss": r["val_loss"], "scale_params": r["params"]})  # fmt: skip
    valid = [p for p in points if p["scale_val_loss"] is not None]
    if len(valid) < 3:
        # A worker of a parallel run (a slice of the pool): its logs are the result.
        return {"points": points, "correlation": None}
    corr = rank_correlation([p["proxy_score"] for p in valid], [p["scale_val_loss"] for p in valid])
    result = {
        "proxy": proxy,
        "proxy_shape": proxy_shape,
        "scale_shape": Architecture.parse("AF", scale_shape).shape.to_dict(),
        "scale_layers": scale_layers,
        "train_config": train_config.to_dict(),
        "pool": [{"pattern": p, "score": s} for p, s in scored],
        "points": points,
        "correlation": corr,
        "wall_seconds_this_call": time.perf_counter() - t0,
    }
    atomic_write_json(out / "result.json", result)
    atomic_write_text(out / "result.md", proxy_rank_markdown(result))
    plot_proxy_rank(valid, corr, out / "proxy_rank.png", proxy)
    return result


def proxy_rank_markdown(result: dict[str, Any]) -> str:
    c = result["correlation"]
    lines = [
        f"Proxy `{result['proxy']}` at shape `{result['proxy_shape']}` vs validation loss after "
        f"{result['train_config']['tokens']:,} training tokens at {result['scale_layers']} "
        f"sublayers, d_model {result['scale_shape']['d_model']}.",
        "",
        f"**Spearman rho = {c['spearman']:.3f}** (p = {c['spearman_p']:.3g}), "
        f"Kendall tau = {c['kendall']:.3f}, n = {c['n']}.",
        "",
        "| pattern | proxy score | scale pattern | params | val loss at scale |",
        "|---|---|---|---|---|",
    ]
    for p in sorted(result["points"], key=lambda p: -p["proxy_score"]):
        p = {**p, "pattern": p["pattern"].replace("|", "\\|"),
             "scale_pattern": p["scale_pattern"].replace("|", "\\|")}  # fmt: skip
        loss = "-" if p["scale_val_loss"] is None else f"{p['scale_val_loss']:.4f}"
        lines.append(
            f"| `{p['pattern']}` | {p['proxy_score']:.4f} | `{p['scale_pattern']}` | "
            f"{p['scale_params']:,} | {loss} |"
        )
    return "\n".join(lines)
