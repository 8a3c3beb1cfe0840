"""``hcomposer run``: the Composer pipeline end to end, resumable stage by stage.

    search -> aggregate -> scale -> train composite + baseline -> evaluate -> report

With ``recipe.train_seeds`` > 1 each model is trained again on further seeds (each run its
own folder ``train/<role>-seed<k>``, its own stage) and only its validation loss is measured;
with ``recipe.rescore_top`` > 0 the search's best patterns are scored again on extra proxy
seeds (``rescore.json``, saved after each evaluation; the evaluations run in the search's
``workers`` processes). The report states both seed noises.

Each stage writes its result into the run folder and is marked done in
``pipeline.json``; a rerun skips finished stages and lets the unfinished one
resume itself (the search from its study, training from its last checkpoint).
"""

from __future__ import annotations

import functools
import math
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.config_io import DamagedFolder, read_run_file, stamp
from hcomposer.data import get_tokenizer
from hcomposer.errors import UserError
from hcomposer.evaluation.efficiency import measure_runs_interleaved
from hcomposer.evaluation.suite import run_suite
from hcomposer.io import atomic_write_json, atomic_write_text
from hcomposer.recipes import Recipe
from hcomposer.reporting.compare import compare_runs, comparison_markdown
from hcomposer.reporting.report import (
    markdown_table,
    plot_pareto,
    plot_pattern_strips,
    plot_trials,
)
from hcomposer.runs import PipelineDir
from hcomposer.scaling.aggregate import aggregate_details
from hcomposer.scaling.extrapolate import extrapolate
from hcomposer.search import load_trials, run_search
from hcomposer.search.objectives import normalise_result, resolve_objective
from hcomposer.shapes import resolve_shape
from hcomposer.training.trainer import resolve_arch, train

__all__ = [
    "run_pipeline",
    "matched_baseline",
    "seed_noise",
    "noise_summary",
    "noise_sentence",
    "noise_markdown",
    "NOISE_RULE",
    "rescore",
]


def matched_baseline(params: int, shape) -> tuple[str, int]:
    """The Llama-style ``(AF)*n`` at ``shape`` whose parameter count is closest to ``params``."""
    best: tuple[int, str, int] | None = None
    n = 1
    while True:
        pattern = "AF" * n
        total = count_costs(Architecture(pattern=pattern, shape=shape)).params_total
        gap = abs(total - params)
        if best is None or gap < best[0]:
            best = (gap, pattern, total)
        if total > params:
            break
        n += 1
    return best[1], best[2]


class _State:
    """pipeline.json: the recipe and what each finished stage produced."""

    def __init__(self, out: Path, recipe: Recipe, argv: list[str] | None):
        self.dir = PipelineDir(out)
        self.path = self.dir.state
        self.out = out
        if self.path.exists():
            data = read_run_file(out, self.path.name, keys=("recipe", "stages"), versioned=True)
            if not isinstance(data["stages"], dict):
                raise DamagedFolder(
                    f"run folder {str(out)!r} is damaged: pipeline.json 'stages' is not an "
                    "object; restore it from a copy, or start again with a new --out"
                )
            try:
                same = Recipe.from_dict(data["recipe"]) == recipe
            except (KeyError, TypeError, ValueError, UserError):
                same = False
            if not same:
                raise UserError(
                    f"{out} holds a run of another configuration (recipe "
                    f"{data.get('recipe', {}).get('name')!r}); choose a new --out or delete it"
                )
            self.data = data
        else:
            if out.exists() and any(out.iterdir()):
                raise UserError(
                    f"{out} exists and is not an hcomposer run folder; choose a new --out"
                )
            self.data = {"recipe": recipe.to_dict(), "stages": {}}
            out.mkdir(parents=True, exist_ok=True)
            self.dir.record(recipe.to_dict(), argv)
            self.save()

    def done(self, stage: str) -> dict | None:
        return self.data["stages"].get(stage)

    def finish(self, stage: str, result: dict) -> dict:
        self.data["stages"][stage] = {**result, "finished": time.time()}
        self.save()
        return result

    def save(self) -> None:
        atomic_write_json(self.path, stamp(self.data))


def _stage_search(state: _State, recipe: Recipe, progress: bool) -> dict:
    result = run_search(recipe.search, state.dir.search.root, progress=progress)
    keep = ("number", "pattern", "score")
    best = result.best
    if isinstance(best, dict):
        best = {k: best.get(k) for k in keep}
    elif isinstance(best, list):  # two objectives: the Pareto front
        best = [{k: b.get(k) for k in keep} for b in best]
    return state.finish("search", {"best": best, "n_trials": len(result.trials)})


def _stage_aggregate(state: _State, recipe: Recipe) -> dict:
    trials = load_trials(state.dir.search.root)
    agg = aggregate_details(trials, method=recipe.aggregate_method, c=recipe.aggregate_c)
    atomic_write_json(state.dir.aggregate, agg.to_dict())
    return state.finish("aggregate", {"pattern": agg.pattern, "method": agg.method})


def _stage_scale(state: _State, recipe: Recipe, searched: str) -> dict:
    shape = resolve_shape(recipe.target_shape)
    layers = recipe.target_layers or shape.n_layers
    pattern = extrapolate(searched, layers, recipe.scale_strategy)
    # Match the baseline on the model that is trained: its vocabulary comes from the
    # tokenizer (byte-level: 320 ids), not from the preset's 32K, which would dominate.
    tcfg = recipe.train
    tokenizer = get_tokenizer(tcfg.tokenizer, source=tcfg.data)
    composite = resolve_arch(Architecture(pattern=pattern, shape=shape), tokenizer, tcfg.seq_len)
    shape = composite.shape
    params = count_costs(composite).params_total
    base_pattern, base_params = matched_baseline(params, shape)
    baseline = Architecture(pattern=base_pattern, shape=shape)
    atomic_write_json(state.dir.architecture("composite"), composite.to_dict())
    atomic_write_json(state.dir.architecture("baseline"), baseline.to_dict())
    return state.finish(
        "scale",
        {
            "searched": searched,
            "strategy": recipe.scale_strategy,
            "composite": pattern,
            "composite_params": params,
            "baseline": base_pattern,
            "baseline_params": base_params,
        },
    )


def _stage_train(state: _State, recipe: Recipe, role: str, argv, progress: bool) -> dict:
    arch = Architecture.from_json(state.dir.architecture(role))
    run_dir = state.dir.train(role)
    result = train(arch, recipe.train, run_dir.root, resume=True, progress=progress, argv=argv)
    if result.status != "completed":
        raise UserError(
            f"training the {role} {arch.pattern} ended with status {result.status!r} "
            f"({result.message}); see {run_dir.status_json}"
        )
    return state.finish(f"train_{role}", {**result.to_dict(), "pattern": arch.pattern})


def _stage_eval(state: _State, recipe: Recipe, role: str, argv, progress: bool) -> dict:
    res = run_suite(state.dir.train(role).root, ",".join(recipe.eval.suites),
                    options=recipe.eval.options(), argv=argv, progress=progress)  # fmt: skip
    parts = res.get("parts", {})
    brief = {
        "loss": (parts.get("loss") or {}).get("loss"),
        "niah": (parts.get("niah") or {}).get("accuracy_mean"),
    }
    return state.finish(f"eval_{role}", brief)


def _stage_report(state: _State, recipe: Recipe) -> dict:
    folder = state.dir
    st = state.data["stages"]
    trials = load_trials(folder.search.root)
    done = sorted(
        (t for t in trials if t.get("state") == "COMPLETE" and t.get("score") is not None),
        key=lambda t: -t["score"],
    )
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
    roles = ["baseline", "composite"]
    runs = [folder.train(role).root for role in roles]
    eff = None
    if "efficiency" in recipe.eval.suites:
        # Both models timed in turn in this process, so outside load cannot favour one.
        eff = measure_runs_interleaved(runs, roles, recipe.eval.efficiency)
    cmp = compare_runs(runs, folder.compare, labels=roles, efficiency=eff,
                       title="Composite against the Llama-style baseline")  # fmt: skip
    top = [[t["number"], t["pattern"], t["score"]] for t in done[:10]]
    lines = [
        f"# hcomposer run — recipe `{recipe.name}`",
        "",
        markdown_table(
            ["stage", "result"],
            [
                [
                    "search",
                    f"{st['search']['n_trials']} trials, best `{done[0]['pattern']}` "
                    f"({done[0]['score']:.4f})"
                    if done
                    else "no completed trial",
                ],
                ["aggregate", f"`{st['aggregate']['pattern']}` ({recipe.aggregate_method})"],
                [
                    "scale",
                    f"`{sc['composite']}` ({sc['strategy']}, {sc['composite_params']:,} params)",
                ],
                ["baseline", f"`{sc['baseline']}` ({sc['baseline_params']:,} params)"],
            ],
        ),
        "",
        "## Search",
        "",
        f"Proxy `{recipe.search.proxy}` at shape "
        f"`{getattr(recipe.search.shape, 'name', recipe.search.shape)}`, "
        f"{recipe.search.sampler} sampler, {recipe.search.layers} positions of "
        f"{'/'.join(recipe.search.primitives)}.",
        "",
        f"![trials]({folder.plot('trials').name})",
        "",
        markdown_table(["trial", "pattern", "score"], top),
        "",
    ]
    if pareto is not None:
        lines += [f"![Pareto front]({folder.plot('pareto').name})", ""]
    lines += ["## Patterns", "", f"![patterns]({folder.plot('patterns').name})", ""]
    noise = noise_summary(state.data, recipe)
    lines += noise_markdown(noise)
    lines += [comparison_markdown(cmp["sections"], images=f"{folder.compare.name}/", level=2)]
    atomic_write_text(folder.report, "\n".join(lines) + "\n")
    return state.finish("report", {"report": str(folder.report),
                                   "table_header": cmp["table_header"],
                                   "table": cmp["table"], "noise": noise})  # fmt: skip


# --- seed noise (train seeds, proxy re-scores) ---------------------------------------------

NOISE_RULE = (
    "a difference is inside the noise when |diff| < 2 * s_p * sqrt(1/n_a + 1/n_b), with s_p "
    "the pooled standard deviation over seeds (n - 1 in the denominators)"
)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    # One value has no seed std (None, so that the JSON files stay standard JSON).
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def seed_noise(baseline: list[float], composite: list[float]) -> dict[str, Any]:
    """Means, seed standard deviations, the difference (composite - baseline) and whether it
    is inside the noise (:data:`NOISE_RULE`). ``inside_noise`` is None with one seed per arm."""
    mb, sb = _mean_std(baseline)
    mc, sc = _mean_std(composite)
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


def _stage_train_seed(state: _State, recipe: Recipe, role: str, k: int, argv, progress) -> dict:
    arch = Architecture.from_json(state.dir.architecture(role))
    run_dir = state.dir.train(role, k)
    cfg = recipe.train.replace(seed=recipe.train.seed + k)
    result = train(arch, cfg, run_dir.root, resume=True, progress=progress, argv=argv)
    if result.status != "completed":
        raise UserError(
            f"training the {role} {arch.pattern} (seed {cfg.seed}) ended with status "
            f"{result.status!r} ({result.message}); see {run_dir.status_json}"
        )
    res = run_suite(run_dir.root, "loss", options=recipe.eval.options(), argv=argv,
                    progress=progress)  # fmt: skip
    loss = ((res.get("parts") or {}).get("loss") or {}).get("loss")
    return state.finish(f"train_{role}_seed{k}", {"seed": cfg.seed, "loss": loss})


def _seed_losses(st: dict[str, Any], recipe: Recipe, role: str) -> list[float]:
    losses = [st[f"eval_{role}"]["loss"]]
    losses += [st[f"train_{role}_seed{k}"]["loss"] for k in range(1, recipe.train_seeds)]
    return [float(x) for x in losses if x is not None]


def _top_patterns(trials: list[dict], n: int) -> list[dict]:
    done = sorted(
        (t for t in trials if t.get("state") == "COMPLETE" and t.get("score") is not None),
        key=lambda t: (-t["score"], t["number"]),
    )
    top: dict[str, dict] = {}
    for t in done:
        top.setdefault(t["pattern"], t)
    return list(top.values())[:n]


def _rescore_one(objective, pattern: str, shape, proxy: str, seed: int) -> float:
    """One re-scoring evaluation (module level: it runs in a spawned process too)."""
    arch = Architecture(pattern=pattern, shape=shape)
    return normalise_result(objective(arch, proxy=proxy, seed=seed)).score


def rescore(objective, cfg, jobs: list[tuple[str, int]]) -> Iterator[tuple[str, int, float]]:
    """Score each ``(pattern, seed)`` of ``jobs`` with ``objective`` at the search config
    ``cfg``'s proxy and shape; yield ``(pattern, seed, score)`` as each evaluation ends. They
    run in this process, or in ``cfg.workers`` spawned processes (like the search's workers:
    one proxy thread each)."""
    if cfg.workers <= 1 or len(jobs) <= 1:
        for pattern, seed in jobs:
            yield pattern, seed, _rescore_one(objective, pattern, cfg.shape, cfg.proxy, seed)
        return
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(cfg.workers, len(jobs)), mp_context=ctx) as pool:
        futures = {
            pool.submit(_rescore_one, objective, pattern, cfg.shape, cfg.proxy, seed): (
                pattern,
                seed,
            )
            for pattern, seed in jobs
        }
        for fut in as_completed(futures):
            yield (*futures[fut], fut.result())


def _stage_rescore(state: _State, recipe: Recipe) -> dict:
    """The search's top patterns on extra proxy seeds; each evaluation saved as it ends, so
    a rerun only runs the missing ones."""
    cfg = recipe.search
    objective = resolve_objective(cfg.proxy, None, cfg.proxy_config)
    saved = state.dir.read_rescore()
    top = _top_patterns(load_trials(state.dir.search.root), recipe.rescore_top)
    for t in top:
        saved.setdefault(t["pattern"], {str(cfg.seed): t["score"]})
    extra = [cfg.seed + k for k in range(1, recipe.rescore_seeds + 1)]
    jobs = [(t["pattern"], s) for t in top for s in extra if str(s) not in saved[t["pattern"]]]
    for pattern, seed, score in rescore(objective, cfg, jobs):
        saved[pattern][str(seed)] = score
        state.dir.write_rescore(saved)
    rows = []
    for t in top:
        scores = dict(sorted(saved[t["pattern"]].items(), key=lambda kv: int(kv[0])))
        mean, std = _mean_std([float(v) for v in scores.values()])
        rows.append({"pattern": t["pattern"], "scores": scores, "mean": mean, "std": std})
    state.dir.write_rescore(saved)
    return state.finish("rescore", {"top": rows})


def _fmt_pm(mean: float, std: float | None, digits: int = 4) -> str:
    if std is None or not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def noise_summary(state_data: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """The seed-noise numbers the report states (also kept in the report stage's result)."""
    st = state_data["stages"]
    out: dict[str, Any] = {"rescore": (st.get("rescore") or {}).get("top", [])}
    out["loss"] = seed_noise(
        _seed_losses(st, recipe, "baseline"), _seed_losses(st, recipe, "composite")
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
                        _fmt_pm(r["mean"], r["std"]),
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
                    _fmt_pm(loss[f"{role}_mean"], loss[f"{role}_std"]),
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


def run_pipeline(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    argv: list[str] | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every stage; returns pipeline.json's content."""
    say = say or (lambda _text: None)
    state = _State(Path(out_dir), recipe, argv)
    t0 = time.perf_counter()

    def stage(name: str, fn: Callable[[], dict]) -> dict:
        prev = state.done(name)
        if prev is not None:
            say(f"[{name}] done earlier, skipped")
            return prev
        say(f"[{name}] ...")
        s = time.perf_counter()
        res = fn()
        say(f"[{name}] finished in {time.perf_counter() - s:.0f}s")
        return res

    stage("search", lambda: _stage_search(state, recipe, progress))
    agg = stage("aggregate", lambda: _stage_aggregate(state, recipe))
    stage("scale", lambda: _stage_scale(state, recipe, agg["pattern"]))
    for role in ("baseline", "composite"):
        stage(f"train_{role}", lambda r=role: _stage_train(state, recipe, r, argv, progress))
    for role in ("baseline", "composite"):
        stage(f"eval_{role}", lambda r=role: _stage_eval(state, recipe, r, argv, progress))
    for k in range(1, recipe.train_seeds):
        for role in ("baseline", "composite"):
            run = functools.partial(_stage_train_seed, state, recipe, role, k, argv, progress)
            stage(f"train_{role}_seed{k}", run)
    if recipe.rescore_top:
        stage("rescore", lambda: _stage_rescore(state, recipe))
    stage("report", lambda: _stage_report(state, recipe))
    state.data["wall_seconds_last_call"] = time.perf_counter() - t0
    state.save()
    return state.data
