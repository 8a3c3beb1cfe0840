"""``hcomposer run``: every stage in order, resumable stage by stage (see the package docstring)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hcomposer.pipeline.aggregate import stage_aggregate
from hcomposer.pipeline.evaluate import stage_eval
from hcomposer.pipeline.report import stage_report, track_report
from hcomposer.pipeline.scale import stage_scale
from hcomposer.pipeline.search import stage_rescore, stage_search
from hcomposer.pipeline.state import State
from hcomposer.pipeline.train import stage_train, stage_train_seed
from hcomposer.recipes import Recipe
from hcomposer.runs import FolderLock
from hcomposer.search.storage import check_storage
from hcomposer.training.trainer import train

__all__ = ["run_pipeline"]


def run_pipeline(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    argv: list[str] | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    report_to: Sequence[str] = (),
    rehearsal: Any = None,
) -> dict[str, Any]:
    """Run (or resume) every stage; returns pipeline.json's content (each stage's wall time
    of its last call under ``wall_seconds``).

    ``report_to``: experiment trackers for the search's trials, each training run's steps,
    and, once the report exists, the pipeline's own run (config, final figures, plots).
    ``rehearsal``: a :class:`hcomposer.pipeline.rehearse.Rehearsal` (``--rehearse``): its
    ``fit`` trains (on two processes), and a ``target`` stage after ``scale`` builds the full
    recipe's target on the meta device.
    """
    say = say or (lambda _text: None)
    # A second `hcomposer run` on this folder is refused while this one runs.
    with FolderLock(out_dir, argv=argv):
        return _run(recipe, Path(out_dir), argv, progress, say, report_to, rehearsal)


def _run(
    recipe: Recipe, out: Path, argv, progress: bool, say: Callable[[str], None], report_to,
    rehearsal=None,
) -> dict:  # fmt: skip
    state = State(out, recipe, argv)
    fit = train if rehearsal is None else rehearsal.fit
    if state.done("search") is None:
        # A damaged study is refused before the first stage's line is printed.
        check_storage(recipe.search.storage, state.dir.search.root)
    t0 = time.perf_counter()

    def stage(name: str, fn: Callable[[], dict]) -> dict:
        prev = state.done(name)
        if prev is not None:
            say(f"[{name}] done earlier, skipped")
            return prev
        say(f"[{name}] ...")
        s = time.perf_counter()
        res = fn()
        wall = time.perf_counter() - s
        state.data.setdefault("wall_seconds", {})[name] = wall
        say(f"[{name}] finished in {wall:.0f}s")
        return res

    stage("search", lambda: stage_search(state, recipe, progress, report_to))
    agg = stage("aggregate", lambda: stage_aggregate(state, recipe))
    stage("scale", lambda: stage_scale(state, recipe, agg["pattern"]))
    if rehearsal is not None:
        stage("target", lambda: state.finish("target", rehearsal.target(agg["pattern"], out)))
    for role in ("baseline", "composite"):
        stage(
            f"train_{role}",
            lambda r=role: stage_train(state, recipe, r, argv, progress, report_to, fit),
        )
    for role in ("baseline", "composite"):
        stage(f"eval_{role}", lambda r=role: stage_eval(state, recipe, r, argv, progress))
    for k in range(1, recipe.train_seeds):
        for role in ("baseline", "composite"):
            run = functools.partial(
                stage_train_seed, state, recipe, role, k, argv, progress, report_to, fit
            )
            stage(f"train_{role}_seed{k}", run)
    if recipe.rescore_top:
        stage("rescore", lambda: stage_rescore(state, recipe))
    stage("report", lambda: stage_report(state, recipe))
    track_report(state, recipe, report_to)
    state.data["wall_seconds_last_call"] = time.perf_counter() - t0
    state.save()
    return state.data
