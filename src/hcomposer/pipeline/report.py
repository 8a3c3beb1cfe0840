"""Stage ``report``: Markdown and PNG plots for the run, with the seed noise stated."""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Any

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.errors import UserError
from hcomposer.evaluation.efficiency_compare import measure_runs_interleaved
from hcomposer.format import markdown_table
from hcomposer.io import atomic_write_text
from hcomposer.pipeline.state import State, fmt_pm, mean_std
from hcomposer.pipeline.train import seed_losses
from hcomposer.proxies.proxy import parse_proxy
from hcomposer.proxies.zoo import trivial_scores
from hcomposer.recipes import Recipe
from hcomposer.reporting.compare import compare_runs, comparison_markdown
from hcomposer.reporting.report import (
    plot_pareto,
    plot_pattern_strips,
    plot_trials,
)
from hcomposer.search import load_trials
from hcomposer.tracking import finite, open_tracking

# What is measured of each proxy's rank agreement with training at scale (figures tested
# against the study's raw files in tests/test_proxy_validity.py).
VALIDITY = "assets/proxy_validity.json"

__all__ = [
    "stage_report",
    "validity_lines",
    "proxy_key",
    "NOISE_RULE",
    "seed_noise",
    "noise_summary",
    "noise_sentence",
    "noise_markdown",
]


def track_report(state: State, recipe: Recipe, report_to) -> None:
    """The pipeline's own tracked run, once: the recipe as hyperparameters, the search's best
    score, the final losses (mean and spread over seeds), the report's plots and report.md."""
    folder = state.dir
    with open_tracking(report_to, folder.tracking, run_name=folder.root.resolve().name,
                       params={"recipe": recipe.to_dict()}) as tracking:  # fmt: skip
        if not tracking or tracking.state.get("report_logged"):
            return
        st = state.data["stages"]
        best = st["search"].get("best")
        metrics = {"search/best_score": best.get("score")} if isinstance(best, dict) else {}
        loss = ((st["report"].get("noise") or {}).get("loss")) or {}
        metrics.update({f"report/{k}_val_loss": v for k, v in loss.items() if finite(v)})
        tracking.log_metrics(metrics, step=0)
        plots = sorted(folder.root.glob("*.png")) + sorted(folder.compare.glob("*.png"))
        tracking.log_images({f"report/{p.stem}": p for p in plots}, step=0)
        tracking.log_text({"report": folder.report.read_text()}, step=0)
        tracking.state["report_logged"] = True
        tracking.save()


def stage_report(state: State, recipe: Recipe) -> dict:
    """Plots, the comparison of composite and baseline, and report.md."""
    folder = state.dir
    trials = load_trials(folder.search.root)
    done = sorted(
        (t for t in trials if t.get("state") == "COMPLETE" and t.get("score") is not None),
        key=lambda t: -t["score"],
    )
    pareto = _plots(state, recipe, trials, done)
    roles = ["baseline", "composite"]
    runs = [folder.train(role).root for role in roles]
    eff = None
    if "efficiency" in recipe.eval.suites:
        # Both models timed in turn in this process, so outside load cannot favour one.
        eff = measure_runs_interleaved(runs, roles, recipe.eval.efficiency)
    cmp = compare_runs(runs, folder.compare, labels=roles, efficiency=eff,
                       title="Composite against the Llama-style baseline")  # fmt: skip
    lines = _summary_lines(state, recipe, done, pareto)
    lines += validity_lines(recipe.search.proxy, recipe.search.shape, done)
    noise = noise_summary(state.data, recipe)
    lines += noise_markdown(noise)
    lines += [comparison_markdown(cmp["sections"], images=f"{folder.compare.name}/", level=2)]
    atomic_write_text(folder.report, "\n".join(lines) + "\n")
    return state.finish("report", {"report": str(folder.report),
                                   "table_header": cmp["table_header"],
                                   "table": cmp["table"], "noise": noise})  # fmt: skip


def _plots(state: State, recipe: Recipe, trials: list[dict], done: list[dict]):
    """Score per trial, the Pareto front (two objectives) and the pattern strips."""
    folder, st = state.dir, state.data["stages"]
    plot_trials(trials, folder.plot("trials"), title=f"Search ({recipe.search.sampler})")
    pareto = None
    if len(recipe.search.objective) > 1:
        cost = recipe.search.objective[1]
        pts = [dict(t, cost=(t.get("values") or [None, None])[1]) for t in done]
        pareto = plot_pareto(pts, folder.plot("pareto"), cost_label=cost)
    sc = st["scale"]
    strips = [(f"#{t['number']} {t['score']:.3f}", t["pattern"]) for t in done[:6]]
    strips += [
        ("aggregated", st["aggregate"]["pattern"]),
        ("composite", sc["composite"]),
        ("baseline", sc["baseline"]),
    ]
    plot_pattern_strips(strips, folder.plot("patterns"), title="Top trials, aggregate, scaled")
    return pareto


def _summary_lines(state: State, recipe: Recipe, done: list[dict], pareto) -> list[str]:
    """The report's head: the stage table, the search section and the patterns."""
    folder, st = state.dir, state.data["stages"]
    sc = st["scale"]
    best = (
        f"{st['search']['n_trials']} trials, best `{done[0]['pattern']}` ({done[0]['score']:.4f})"
        if done
        else "no completed trial"
    )
    stages = [
        ["search", best],
        ["aggregate", f"`{st['aggregate']['pattern']}` ({recipe.aggregate_method})"],
        ["scale", f"`{sc['composite']}` ({sc['strategy']}, {sc['composite_params']:,} params)"],
        ["baseline", f"`{sc['baseline']}` ({sc['baseline_params']:,} params)"],
    ]
    search = recipe.search
    top = [[t["number"], t["pattern"], t["score"]] for t in done[:10]]
    lines = [
        f"# hcomposer run — recipe `{recipe.name}`", "",
        markdown_table(["stage", "result"], stages), "",
        "## Search", "",
        f"Proxy `{search.proxy}` at shape `{getattr(search.shape, 'name', search.shape)}`, "
        f"{search.sampler} sampler, {search.layers} positions of "
        f"{'/'.join(search.primitives)}.", "",
        f"![trials]({folder.plot('trials').name})", "",
        markdown_table(["trial", "pattern", "score"], top), "",
    ]  # fmt: skip
    if pareto is not None:
        lines += [f"![Pareto front]({folder.plot('pareto').name})", ""]
    return lines + ["## Patterns", "", f"![patterns]({folder.plot('patterns').name})", ""]


def _validity() -> dict[str, Any]:
    return json.loads(resources.files("hcomposer").joinpath(VALIDITY).read_text())


def proxy_key(proxy: str) -> str:
    """The canonical spelling of a proxy (aliases resolved); a name that is not one of the
    registered proxies (a test objective) is kept as it is."""
    try:
        kind, names = parse_proxy(proxy)
    except UserError:
        return proxy
    return kind if not names else f"{kind}:{','.join(names)}"


def validity_lines(proxy: str, shape, done: list[dict], top: int = 5) -> list[str]:
    """How far the proxy's ranking is known to agree with training at scale, beside the
    free rankings, and where those would have put the search's top candidates."""
    v = _validity()
    entry = v["proxies"].get(proxy_key(proxy))
    triv = v["trivial"]
    fmt = lambda f: f"{f['spearman']:.2f} [{f['ci'][0]:.2f}, {f['ci'][1]:.2f}]"  # noqa: E731
    lines = ["## How far to trust the proxy", ""]
    free = (f"the free rule \"has an S or D layer\" got {fmt(triv['has S/D'])} and the count "
            f"of S+D layers {fmt(triv['count of S+D'])}")  # fmt: skip
    where = f"{v['settings']} (`{v['study']}`, measured {v['measured']})"
    if entry is None:
        six = v["proxies"]["mad"]
        lines.append(
            f"The rank agreement of `{proxy}` with training at scale has not been measured. "
            f"On {where}, the six MAD tasks got Spearman {fmt(six)} with the loss at scale; "
            f"{free}."
        )
    else:
        lines.append(
            f"On {where}, ranking by {entry['name']} gave Spearman {fmt(entry)} with the loss "
            f"at scale; {free}."
        )
        if entry["ci"][1] < triv["has S/D"]["spearman"]:
            lines.append(
                "A one-line rule ranked those patterns better than this proxy did: weigh its "
                "picks with that in mind."
            )
    lines += ["", v["next"], ""]
    return lines + _trivial_placement(shape, done, top)


def _trivial_placement(shape, done: list[dict], top: int) -> list[str]:
    """The top candidates' ranks among the searched patterns under each free ranking."""
    unique: dict[str, float] = {}
    for t in done:
        unique.setdefault(t["pattern"], t["score"])
    if len(unique) < 2:
        return []
    pats = sorted(unique, key=lambda p: -unique[p])
    params = {p: count_costs(Architecture.parse(p, shape)).params_non_embedding for p in pats}
    rankers = {"proxy": unique, **trivial_scores(pats, params)}

    def rank(scores: dict[str, float], p: str) -> int:
        return 1 + sum(scores[q] > scores[p] for q in pats)

    header = ["pattern", *(f"rank by {name}" for name in rankers)]
    rows = [[f"`{p}`", *(rank(sc, p) for sc in rankers.values())] for p in pats[:top]]
    return [
        f"Where the free rankings would have put the search's top {min(top, len(pats))} of "
        f"{len(pats)} patterns (1 = ranked best; ties share a rank):",
        "",
        markdown_table(header, rows),
        "",
    ]


NOISE_RULE = (
    "a difference is inside the noise when |diff| < 2 * s_p * sqrt(1/n_a + 1/n_b), with s_p "
    "the pooled standard deviation over seeds (n - 1 in the denominators)"
)


def seed_noise(baseline: list[float], composite: list[float]) -> dict[str, Any]:
    """Means, seed standard deviations, the difference (composite - baseline) and whether it
    is inside the noise (:data:`NOISE_RULE`). ``inside_noise`` is None with one seed per arm."""
    mb, sb = mean_std(baseline)
    mc, sc = mean_std(composite)
    nb, nc = len(baseline), len(composite)
    diff = mc - mb
    out: dict[str, Any] = {
        "baseline": baseline, "composite": composite,
        "baseline_mean": mb, "baseline_std": sb, "composite_mean": mc, "composite_std": sc,
        "diff": diff, "pooled_std": None, "threshold": None, "inside_noise": None,
    }  # fmt: skip
    if nb + nc > 2 and nb >= 1 and nc >= 1 and max(nb, nc) > 1:
        ss = sum((x - mb) ** 2 for x in baseline) + sum((x - mc) ** 2 for x in composite)
        pooled = math.sqrt(ss / (nb + nc - 2))
        threshold = 2 * pooled * math.sqrt(1 / nb + 1 / nc)
        out.update(pooled_std=pooled, threshold=threshold, inside_noise=abs(diff) < threshold)
    return out


def noise_summary(state_data: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """The seed-noise numbers the report states (also kept in the report stage's result)."""
    st = state_data["stages"]
    out: dict[str, Any] = {"rescore": (st.get("rescore") or {}).get("top", [])}
    out["loss"] = seed_noise(
        seed_losses(st, recipe, "baseline"), seed_losses(st, recipe, "composite")
    )
    return out


def noise_sentence(loss: dict[str, Any]) -> str:
    """One plain sentence on the composite-baseline loss difference."""
    diff = f"composite - baseline validation loss = {loss['diff']:+.4f}"
    if loss["inside_noise"] is None:
        return f"{diff} (one seed each: the seed noise is not measured)."
    if loss["inside_noise"]:
        return f"{diff}, threshold {loss['threshold']:.4f}: the difference is inside the noise."
    better = "composite" if loss["diff"] < 0 else "baseline"
    return (
        f"{diff}, threshold {loss['threshold']:.4f}: outside the noise; the {better} has "
        "the lower loss."
    )


def noise_markdown(noise: dict[str, Any]) -> list[str]:
    """The report's "Seed noise" section."""
    lines = ["## Seed noise", ""]
    if noise["rescore"]:
        lines += [
            "The search's top patterns, scored again on extra proxy seeds "
            "(mean ± standard deviation over seeds):",
            "",
            markdown_table(
                ["pattern", "scores by proxy seed", "mean ± std"],
                [
                    [
                        f"`{r['pattern']}`",
                        ", ".join(f"{s}: {v:.4f}" for s, v in r["scores"].items()),
                        fmt_pm(r["mean"], r["std"]),
                    ]
                    for r in noise["rescore"]
                ],
            ),
            "",
        ]
    loss = noise["loss"]
    lines += [
        "Validation loss of each training seed:",
        "",
        markdown_table(
            ["model", "loss by seed", "mean ± std"],
            [
                [
                    role,
                    ", ".join(f"{v:.4f}" for v in loss[role]),
                    fmt_pm(loss[f"{role}_mean"], loss[f"{role}_std"]),
                ]
                for role in ("baseline", "composite")
            ],
        ),
        "",
        noise_sentence(loss),
        "",
        f"Rule: {NOISE_RULE}.",
        "",
    ]
    return lines
