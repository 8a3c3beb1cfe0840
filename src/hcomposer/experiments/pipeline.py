"""``hcomposer run``: the Composer pipeline end to end, resumable stage by stage.

    search -> aggregate -> scale -> train composite + baseline -> evaluate -> report

Each stage writes its result into the run folder and is marked done in
``pipeline.json``; a rerun skips finished stages and lets the unfinished one
resume itself (the search from its study, training from its last checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
from hcomposer.shapes import resolve_shape
from hcomposer.training.trainer import resolve_arch, train

__all__ = ["run_pipeline", "matched_baseline"]


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
        f"![trials]({folder.plot('trials').name})",
        "",
        markdown_table(["trial", "pattern", "score"], top),
        "",
    ]
    if pareto is not None:
        lines += [f"![Pareto front]({folder.plot('pareto').name})", ""]
    lines += ["## Patterns", "", f"![patterns]({folder.plot('patterns').name})", ""]
    lines += [comparison_markdown(cmp["sections"], images=f"{folder.compare.name}/", level=2)]
    atomic_write_text(folder.report, "\n".join(lines) + "\n")
    return state.finish("report", {"report": str(folder.report),
                                   "table_header": cmp["table_header"],
                                   "table": cmp["table"]})  # fmt: skip


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
    stage("report", lambda: _stage_report(state, recipe))
    state.data["wall_seconds_last_call"] = time.perf_counter() - t0
    state.save()
    return state.data
