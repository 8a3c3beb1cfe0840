"""Proxy-to-scale validity: does the proxy rank architectures as training at scale does?

Recipe (``run_proxy_rank``):
1. score a pool of patterns with the proxy (at the proxy shape);
2. keep ``k`` of them spread evenly across the proxy's score range (sorted by
   score, evenly spaced ranks, both ends included), so the test is not decided
   by a cluster of near-equal candidates;
3. extrapolate each kept pattern to ``scale_layers`` sublayers (``stack``) at the
   larger ``scale_shape`` and train it on text for ``train_config.tokens``;
4. report Spearman's rho (scipy) between proxy scores and minus the validation
   loss at scale (both "higher is better") with a 95% bootstrap interval over the
   patterns, Kendall's tau, and a scatter plot.

Seeds: every pattern is scored with the proxy on each of ``proxy_seeds`` (the mean
is its score) and trained at scale on ``scale_seeds``; the patterns named in
``noise_patterns`` are also trained on ``noise_seeds``, which measures the scale
runs' own seed noise. The report states both noises beside the correlation.

Every step appends to a JSON-lines log in ``out_dir`` (one line per pattern and
seed), so a killed run resumes where it stopped and a finished run is never
repeated; ``result.json``, ``result.md`` and ``proxy_rank.png`` are written
atomically at the end.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hcomposer.architecture import Architecture
from hcomposer.errors import UserError
from hcomposer.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from hcomposer.plots import save_png, subplots
from hcomposer.proxies.proxy import evaluate_proxy
from hcomposer.proxies.proxy_config import ProxyConfig
from hcomposer.scaling.extrapolate import stack
from hcomposer.stats import pair_agreement, seed_std, spearman_ci
from hcomposer.training.trainer import TrainConfig, train

__all__ = [
    "RankStudy",
    "select_across_range",
    "rank_correlation",
    "run_proxy_rank",
    "plot_proxy_rank",
    "study_scale_losses",
]


def select_across_range(scored: list[tuple[str, float]], k: int) -> list[tuple[str, float]]:
    """``k`` items evenly spaced in score rank (lowest and highest included)."""
    ranked = sorted(scored, key=lambda p: (p[1], p[0]))
    if k >= len(ranked):
        return ranked
    if k == 1:
        return [ranked[-1]]
    idx = sorted({round(i * (len(ranked) - 1) / (k - 1)) for i in range(k)})
    return [ranked[i] for i in idx]


def study_scale_losses(*folders: str | Path) -> dict[str, float]:
    """Mean validation loss at scale per pattern, over every finished run in the
    ``scale_losses.jsonl`` of one or more study folders (runs without a loss are skipped).

    Lets another proxy be checked against a study's scale runs without training again.
    """
    losses: dict[str, list[float]] = {}
    for folder in folders:
        for r in read_jsonl(Path(folder) / "scale_losses.jsonl"):
            if r.get("val_loss") is not None:
                losses.setdefault(r["pattern"], []).append(float(r["val_loss"]))
    return {p: statistics.fmean(v) for p, v in losses.items()}


def rank_correlation(proxy_scores: list[float], scale_losses: list[float]) -> dict[str, float]:
    """Spearman rho (with a 95% bootstrap interval) and Kendall tau: scores vs minus losses."""
    from scipy import stats

    if len(proxy_scores) != len(scale_losses) or len(proxy_scores) < 3:
        raise UserError("rank correlation needs at least 3 (score, loss) pairs")
    neg = [-v for v in scale_losses]
    rho, p_rho = stats.spearmanr(proxy_scores, neg)
    tau, p_tau = stats.kendalltau(proxy_scores, neg)
    _, lo, hi = spearman_ci(proxy_scores, neg)
    return {
        "spearman": float(rho),
        "spearman_ci": [lo, hi],
        "spearman_p": float(p_rho),
        "kendall": float(tau),
        "kendall_p": float(p_tau),
        "n": len(proxy_scores),
    }


def plot_proxy_rank(points: list[dict[str, Any]], corr: dict[str, float], path, proxy: str):
    fig, ax = subplots(figsize=(6, 4.2))
    xs = [p["proxy_score"] for p in points]
    ys = [p["scale_val_loss"] for p in points]
    ax.scatter(xs, ys)
    for p in points:
        ax.annotate(p["pattern"], (p["proxy_score"], p["scale_val_loss"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel(f"proxy score ({proxy}, higher is better)")
    ax.set_ylabel("validation loss at scale")
    if any(p.get("scale_std") for p in points) or any(p.get("proxy_std") for p in points):
        xerr = [p.get("proxy_std", 0.0) for p in points]
        yerr = [p.get("scale_std", 0.0) for p in points]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="none", alpha=0.5)
    lo, hi = corr.get("spearman_ci", [float("nan")] * 2)
    ax.set_title(
        f"Spearman rho = {corr['spearman']:.2f} [{lo:.2f}, {hi:.2f}], "
        f"Kendall tau = {corr['kendall']:.2f}"
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def _run_name(pattern: str, seed: int) -> str:
    name = pattern.replace("|", "_").replace("[", "(").replace("]", ")")
    # Seed 0 keeps the folder name of runs made before seeds were recorded.
    return name if seed == 0 else f"{name}-seed{seed}"


@dataclass(frozen=True, kw_only=True)
class RankStudy:
    """What decides a proxy-to-scale study: the proxy and its shape, the scale runs' shape,
    depth and training, and the seeds (``seed`` is the proxy seed of lines logged before
    seeds were recorded, and the default proxy seed)."""

    proxy: str = "mad"
    proxy_shape: str = "proxy"
    proxy_config: ProxyConfig | None = None
    scale_shape: Any = "10m"
    scale_layers: int = 12
    train_config: TrainConfig = field(
        default_factory=lambda: TrainConfig(tokens=500_000, seq_len=128, batch_size=8)
    )
    seed: int = 0
    proxy_seeds: tuple[int, ...] = ()
    scale_seeds: tuple[int, ...] = ()
    noise_patterns: tuple[str, ...] = ()
    noise_seeds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "proxy_seeds", tuple(self.proxy_seeds) or (self.seed,))
        scale = tuple(self.scale_seeds) or (self.train_config.seed,)
        object.__setattr__(self, "scale_seeds", scale)

    def settings(self) -> dict[str, Any]:
        """What makes two calls' logged runs comparable: everything but seeds and patterns."""
        train = {k: v for k, v in self.train_config.to_dict().items() if k != "seed"}
        return {
            "proxy": self.proxy,
            "proxy_shape": self.proxy_shape,
            # Resolved: a study resumed after the proxy's defaults changed would mix proxies.
            "proxy_config": (self.proxy_config or ProxyConfig()).to_dict(),
            "scale_shape": Architecture.parse("AF", self.scale_shape).shape.to_dict(),
            "scale_layers": self.scale_layers,
            "train_config": train,
        }


def _run_name(pattern: str, seed: int) -> str:
    name = pattern.replace("|", "_").replace("[", "(").replace("]", ")")
    # Seed 0 keeps the folder name of runs made before seeds were recorded.
    return name if seed == 0 else f"{name}-seed{seed}"


def _check_study(out: Path, study: RankStudy) -> None:
    """Refuse to add runs to a study folder made with other settings (they would be mixed
    into one correlation); record the settings on a folder's first call."""
    want = json.loads(json.dumps(study.settings()))
    path = out / "study.json"
    if path.is_file():
        have = json.loads(path.read_text())
        diff = [k for k in want if k != "train_config" and have.get(k) != want[k]]
        old_t, new_t = have.get("train_config") or {}, want["train_config"]
        diff += [
            f"train_config.{k}" for k in sorted({*old_t, *new_t}) if old_t.get(k) != new_t.get(k)
        ]
        if diff:
            raise UserError(
                f"{out} holds a study made with other settings ({', '.join(diff)}); "
                "give a new --out, or the same settings to resume it"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, want)


def run_proxy_rank(
    patterns: list[str],
    out_dir: str | Path,
    study: RankStudy | None = None,
    *,
    k: int = 8,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The recipe in the module docstring; returns the result dict (also written to out_dir)."""
    out = Path(out_dir)
    study = study or RankStudy()
    _check_study(out, study)
    t0 = time.perf_counter()
    scored, proxy_runs, proxy_tasks = _score_pool(out, patterns, study, log)
    chosen = select_across_range(scored, k)
    points = [_scale_point(out, pat, score, proxy_runs[pat], study, log) for pat, score in chosen]
    valid = [p for p in points if p["scale_val_loss"] is not None]
    if len(valid) < 3:
        # A worker of a parallel run (a slice of the pool): its logs are the result.
        return {"points": points, "correlation": None}
    result = _result(study, scored, points, valid, proxy_tasks)
    result["wall_seconds_this_call"] = time.perf_counter() - t0
    atomic_write_json(out / "result.json", result)
    atomic_write_text(out / "result.md", proxy_rank_markdown(result))
    plot_proxy_rank(valid, result["correlation"], out / "proxy_rank.png", study.proxy)
    return result


def _score_pool(out: Path, patterns: list[str], study: RankStudy, log):
    """Every pattern's proxy score on each proxy seed (logged, resumed): ``(pattern, mean)``
    pairs, the per-seed scores and the per-seed task results."""
    proxy_log = out / "proxy_scores.jsonl"
    # Lines written before seeds were recorded were made with ``study.seed``.
    done = {(r["pattern"], r.get("seed", study.seed)): r for r in read_jsonl(proxy_log)}
    scored, proxy_runs, proxy_tasks = [], {}, {}
    for pat in patterns:
        arch = Architecture.parse(pat, study.proxy_shape)
        for s in study.proxy_seeds:
            if (arch.pattern, s) not in done:
                res = evaluate_proxy(arch, study.proxy, seed=s, config=study.proxy_config)
                rec = {"pattern": arch.pattern, "seed": s, "score": res.score,
                       "wall_seconds": res.wall_seconds, "tasks": res.tasks}  # fmt: skip
                append_jsonl(proxy_log, rec)
                done[(arch.pattern, s)] = rec
                log(f"proxy {arch.pattern} seed {s}: {res.score:.4f} ({res.wall_seconds:.0f}s)")
        runs = [done[(arch.pattern, s)] for s in study.proxy_seeds]
        proxy_runs[arch.pattern] = [r["score"] for r in runs]
        proxy_tasks[arch.pattern] = [r.get("tasks") or {} for r in runs]
        scored.append((arch.pattern, sum(proxy_runs[arch.pattern]) / len(runs)))
    return scored, proxy_runs, proxy_tasks


def _scale_point(out: Path, pat: str, score: float, proxy_scores: list[float],
                 study: RankStudy, log) -> dict[str, Any]:  # fmt: skip
    """One chosen pattern trained at scale on its seeds (logged, resumed) and its point."""
    noisy = {Architecture.parse(p, study.proxy_shape).pattern for p in study.noise_patterns}
    scale_log = out / "scale_losses.jsonl"
    seed0 = study.train_config.seed
    trained = {(r["pattern"], r.get("seed", seed0)): r for r in read_jsonl(scale_log)}
    big = Architecture.parse(stack(pat, study.scale_layers), study.scale_shape)
    extra = study.noise_seeds if pat in noisy else ()
    seeds = list(dict.fromkeys([*study.scale_seeds, *extra]))
    for s in seeds:
        if (pat, s) in trained:
            continue
        run_dir = out / "runs" / _run_name(pat, s)
        res = train(big, study.train_config.replace(seed=s), run_dir, resume=run_dir.exists(),
                    progress=False)  # fmt: skip
        rec = {
            "pattern": pat, "seed": s, "scale_pattern": big.pattern, "val_loss": res.val_loss,
            "status": res.status, "params": res.params_total,
            "wall_seconds": res.wall_seconds, "tokens_per_s": res.tokens_per_second,
        }  # fmt: skip
        append_jsonl(scale_log, rec)
        trained[(pat, s)] = rec
        log(f"scale {big.pattern} seed {s}: val_loss {res.val_loss} ({res.wall_seconds:.0f}s)")
    runs = [trained[(pat, s)] for s in seeds]
    losses = [r["val_loss"] for r in runs if r["val_loss"] is not None]
    return {
        "pattern": pat, "proxy_score": score, "proxy_scores": proxy_scores,
        "proxy_std": seed_std(proxy_scores), "scale_pattern": runs[0]["scale_pattern"],
        "scale_val_loss": sum(losses) / len(losses) if losses else None,
        "scale_losses": {str(s): trained[(pat, s)]["val_loss"] for s in seeds},
        "scale_std": seed_std(losses) if losses else 0.0, "scale_params": runs[0]["params"],
    }  # fmt: skip


def _result(study: RankStudy, scored, points, valid, proxy_tasks) -> dict[str, Any]:
    """The correlation, pair agreement, per-task correlations and both seed noises."""
    corr = rank_correlation([p["proxy_score"] for p in valid], [p["scale_val_loss"] for p in valid])
    multi = [p for p in valid if len([v for v in p["scale_losses"].values() if v]) > 1]
    pairs = pair_agreement(
        {p["pattern"]: p["proxy_scores"] for p in valid},
        {p["pattern"]: [v for v in p["scale_losses"].values() if v is not None] for p in valid},
    )
    by_task = task_correlations({p["pattern"]: proxy_tasks[p["pattern"]] for p in valid},
                                {p["pattern"]: p["scale_val_loss"] for p in valid})  # fmt: skip
    median_std = sorted(p["proxy_std"] for p in valid)[len(valid) // 2]
    return {
        "proxy": study.proxy,
        "proxy_shape": study.proxy_shape,
        "scale_shape": Architecture.parse("AF", study.scale_shape).shape.to_dict(),
        "scale_layers": study.scale_layers,
        "train_config": study.train_config.to_dict(),
        "proxy_seeds": list(study.proxy_seeds),
        "scale_seeds": list(study.scale_seeds),
        "pool": [{"pattern": p, "score": s} for p, s in scored],
        "points": points,
        "correlation": corr,
        "pairs": pairs,
        "task_correlations": by_task,
        "noise": {
            "proxy_seed_std_median": median_std if len(study.proxy_seeds) > 1 else None,
            "scale_seed_std": {p["pattern"]: p["scale_std"] for p in multi},
        },
    }


def proxy_rank_markdown(result: dict[str, Any]) -> str:
    c = result["correlation"]
    lines = [
        f"Proxy `{result['proxy']}` at shape `{result['proxy_shape']}` vs validation loss after "
        f"{result['train_config']['tokens']:,} training tokens at {result['scale_layers']} "
        f"sublayers, d_model {result['scale_shape']['d_model']}.",
        "",
        f"**Spearman rho = {c['spearman']:.3f}** "
        + (
            f"(95% bootstrap interval {c['spearman_ci'][0]:.2f} to {c['spearman_ci'][1]:.2f}; "
            if "spearman_ci" in c
            else "("
        )  # fmt: skip
        + f"p = {c['spearman_p']:.3g}), Kendall tau = {c['kendall']:.3f}, n = {c['n']}.",
        "",
        *_noise_lines(result),
        *_pair_lines(result),
        *_task_lines(result),
        "| pattern | proxy score (seed std) | scale pattern | params | val loss at scale "
        "(seed std) |",
        "|---|---|---|---|---|",
    ]
    for p in sorted(result["points"], key=lambda p: -p["proxy_score"]):
        p = {**p, "pattern": p["pattern"].replace("|", "\\|"),
             "scale_pattern": p["scale_pattern"].replace("|", "\\|")}  # fmt: skip
        loss = "-" if p["scale_val_loss"] is None else f"{p['scale_val_loss']:.4f}"
        if p.get("scale_std"):
            loss += f" ({p['scale_std']:.4f})"
        score = f"{p['proxy_score']:.4f}"
        if len(p.get("proxy_scores", [])) > 1:
            score += f" ({p['proxy_std']:.4f})"
        lines.append(
            f"| `{p['pattern']}` | {score} | `{p['scale_pattern']}` | "
            f"{p['scale_params']:,} | {loss} |"
        )
    return "\n".join(lines)


def task_correlations(
    tasks: dict[str, list[dict[str, Any]]], losses: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """Spearman (with its bootstrap interval) of each proxy task's mean accuracy against
    minus the loss at scale: which task carries the ranking. ``tasks`` maps a pattern to its
    per-seed task results (``{task: {"accuracy": ...}}``); tasks some pattern lacks are
    left out."""
    pats = sorted(losses)
    names = list(tasks[pats[0]][0]) if pats and tasks[pats[0]] else []
    out = {}
    for name in names:
        if not all(all(name in r for r in tasks[p]) for p in pats):
            continue
        acc = [statistics.fmean(_accuracy(r[name]) for r in tasks[p]) for p in pats]
        if len(set(acc)) < 2:
            continue
        rho, lo, hi = spearman_ci(acc, [-losses[p] for p in pats])
        out[name] = {"spearman": rho, "spearman_ci": [lo, hi],
                     "accuracy": dict(zip(pats, acc))}  # fmt: skip
    return out


def _accuracy(task: Any) -> float:
    return float(task["accuracy"] if isinstance(task, dict) else task)


def _task_lines(result: dict[str, Any]) -> list[str]:
    by_task = result.get("task_correlations") or {}
    if len(by_task) < 2:
        return []
    return [
        "Each proxy task's mean accuracy against minus the loss at scale (Spearman, 95% "
        "bootstrap interval; exploratory: one test per task, read with the number of tasks "
        "in mind): "
        + "; ".join(
            f"{name} {v['spearman']:.2f} [{v['spearman_ci'][0]:.2f}, {v['spearman_ci'][1]:.2f}]"
            for name, v in by_task.items()
        )
        + ".",
        "",
    ]


def _pair_lines(result: dict[str, Any]) -> list[str]:
    a = result.get("pairs")
    if not a or not a["pairs"]:
        return []
    lines = [
        f"Pairs the proxy separates beyond its seed noise (two-sided t test at "
        f"{a['level']:.0%}, pooled std {a['proxy_std']:.4f}): {a['proxy_separated']} of "
        f"{a['pairs']}; the scale runs order {a['proxy_concordant']} of them the same way."
    ]
    if a["scale_dof"]:
        lines.append(
            f"Pairs separated on both sides (scale noise: pooled std {a['scale_std']:.4f} on "
            f"{a['scale_dof']} dof): {a['both_separated']}, of which {a['both_concordant']} "
            "agree."
        )
    if a["discordant"]:
        lines.append(
            "Ordered the other way at scale: "
            + ", ".join(f"`{hi}` > `{lo}`" for hi, lo in a["discordant"]).replace("|", "\\|")
            + " (proxy order)."
        )
    return [*lines, ""]


def _noise_lines(result: dict[str, Any]) -> list[str]:
    noise = result.get("noise") or {}
    out = []
    if noise.get("proxy_seed_std_median") is not None:
        out.append(
            f"Proxy seed noise: median per-pattern std {noise['proxy_seed_std_median']:.4f} "
            f"over seeds {result['proxy_seeds']}."
        )
    if noise.get("scale_seed_std"):
        out.append(
            "Scale seed noise (val loss std): "
            + ", ".join(f"`{k}` {v:.4f}" for k, v in noise["scale_seed_std"].items())
            + ". Loss gaps smaller than about twice this are inside the noise."
        )
    return [*out, ""] if out else []
