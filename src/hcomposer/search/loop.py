"""The search loop: ask a sampler, check constraints and the log, evaluate, tell.

Every proposal is an Optuna trial, and what happens to it is recorded on it
(``role`` user attribute, shown as the ``state`` of :func:`load_trials`):

- a new, feasible pattern is trained by the objective (``COMPLETE``); only these count
  toward ``--trials``;
- a pattern already scored in this stage is answered from the log: the trial is told
  the earlier trial's values (``CACHED``, ``cached_from``), nothing is trained;
- a pattern that violates a constraint is not trained: the trial records its constraint
  values with ``Trial.set_constraint`` (Optuna's constrained optimisation, so GP uses
  constrained EI and TPE/NSGA-II rank it as infeasible) and is told the worst possible
  score, ``-inf``, with its real costs (``INFEASIBLE``, ``failure`` says why);
- an objective that raises or returns a non-finite score fails the trial (``FAIL``);
- with ``--pruner median|hyperband`` the proxy's per-task values go to Optuna's pruner; a
  trial it stops is stored as ``PRUNED`` (no score; ``pruned_value`` holds its last
  intermediate value), counts toward ``--trials`` and is not run again on resume.

Cheap proposals (cached, infeasible, failed-before) are capped at
``max(50, 5 x stage trials)`` per stage, so a sampler that has converged, or tight
constraints, end the search early with a note instead of looping.

Resuming: a RUNNING trial whose worker is gone is failed and its pattern enqueued
again (see :mod:`hcomposer.search.storage`). Workers agree on the budget and on who
trains a pattern by claiming it under a per-study lock (:mod:`hcomposer.search.claims`).
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution

from hcomposer.config_io import read_run_file, stamp
from hcomposer.errors import UserError
from hcomposer.io import atomic_write_json, atomic_write_text
from hcomposer.runs import SearchDir
from hcomposer.search import results as R
from hcomposer.search.budget import POLL, count_trials
from hcomposer.search.executors import Executor, LocalExecutor, run_threads
from hcomposer.search.live import LiveView
from hcomposer.search.objectives import Objective, check_proxy, resolve_objective
from hcomposer.search.optuna_compat import heartbeat
from hcomposer.search.pruners import make_pruner
from hcomposer.search.samplers import default_n_startup, make_sampler
from hcomposer.search.space import (
    SearchConfig,
    Stage,
    param_name,
    plan_stages,
    split_pattern,
)
from hcomposer.search.storage import (
    check_storage,
    open_storage,
    reap_dead_trials,
    storage_url,
)
from hcomposer.search.tracked import TrialFeed
from hcomposer.search.trial import TrialSteps
from hcomposer.tracking import open_tracking

__all__ = ["SearchResult", "run_search", "prepare_run_folder", "load_trials"]

load_trials = R.load_trials


@dataclass
class SearchResult:
    """What ``run_search`` returns and ``summary.json`` holds."""

    out_dir: str
    config: SearchConfig
    trials: list[dict[str, Any]]
    best: Any
    stages: list[dict[str, Any]]
    wall_seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": self.out_dir,
            "objectives": list(self.config.objective),
            "best": self.best,
            "stages": self.stages,
            "wall_seconds": round(self.wall_seconds, 3),
            "notes": self.notes,
            "config": self.config.to_dict(),
            "trials": self.trials,
        }


def _identity_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = []
    for k in keys[:4]:
        a, b = old.get(k), new.get(k)
        if k == "shape":
            parts.append("shape")
        else:
            parts.append(f"{k} {a!r} -> {b!r}")
    return ", ".join(parts) + (" ..." if len(keys) > 4 else "")


def prepare_run_folder(config: SearchConfig, out_dir: str | Path, argv: list[str] | None) -> bool:
    """Check everything, then create/record the run folder. Returns True when resuming.

    Raises UserError (and writes nothing) for an unreachable storage, an unknown proxy,
    or a folder that holds a search with another configuration.
    """
    folder = SearchDir(out_dir)
    out = folder.root
    check_proxy(config.proxy)
    plan_stages(config)  # a budget the space cannot hold is refused before anything is written
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder")
    existing = folder.config
    resuming = existing.is_file()
    if resuming:
        try:
            stored = read_run_file(
                out, existing.name, kind="search", keys=("config",), versioned=True
            )
            old = SearchConfig.from_dict(stored["config"]).identity()
        except (KeyError, ValueError, TypeError, UserError) as e:
            raise UserError(
                f"{str(existing)!r} is not a readable search config ({e}); pick a new --out"
            ) from None
        if old != config.identity():
            raise UserError(
                f"{str(out)!r} holds a search with another configuration "
                f"({_identity_diff(old, config.identity())}); re-run with the same options to "
                "resume it, or pick a new --out"
            )
    elif folder.study_db.exists():
        raise UserError(
            f"{str(out)!r} holds a {folder.study_db.name} without {existing.name}; pick a new --out"
        )
    check_storage(config.storage, out)
    out.mkdir(parents=True, exist_ok=True)
    # Create the storage's tables before search.json exists: readers (load_trials, other
    # workers) wait for search.json, so they never race this creation.
    open_storage(storage_url(config.storage, out))
    if not resuming:
        atomic_write_json(existing, stamp({"config": config.to_dict()}))
    folder.record(config.to_dict(), argv)
    return resuming


def _open_study(storage, config: SearchConfig, stage: Stage) -> optuna.Study:
    sampler = make_sampler(
        config.sampler,
        config.seed + 1000 * stage.index,
        len(config.objective),
        n_startup=config.n_startup or default_n_startup(stage.trials),
        population_size=config.population_size,
    )
    name = R.study_name(config, stage.index)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        sampler=sampler,
        pruner=make_pruner(config.pruner),
        directions=config.directions,
        load_if_exists=True,
    )
    info = stage.to_dict()
    stored = study.user_attrs.get("stage")
    if stored is None:
        study.set_user_attr("stage", info)
        study.set_user_attr("config", config.identity())
    elif stored != info:
        raise RuntimeError(f"stage {stage.index} was started with {stored}, now {info}")
    return study


def _fixed_parts(config: SearchConfig, stage: Stage, previous_best: str | None) -> Stage:
    if stage.index == 0 or previous_best is None:
        return stage
    parts = split_pattern(previous_best)
    if config.strategy == "end-incremental":
        return stage.with_fixed(parts, ())
    cut = math.ceil(len(parts) / 2)
    return stage.with_fixed(parts[:cut], parts[cut:])


def _stage_best(study: optuna.Study, config: SearchConfig) -> str | None:
    records = [R.trial_record(t, 0, config.objective) for t in study.get_trials(deepcopy=False)]
    return R.stage_best(records, config.objective)[1]


class _Worker:
    """Runs the stages of one search in one process, sharing the storage with others."""

    def __init__(self, config, out_dir, url, objective, view=None, parent_pid=None, feed=None):
        self.config: SearchConfig = config
        self.feed: TrialFeed | None = feed
        self.out = Path(out_dir)
        self.storage = open_storage(url)
        self.objective = objective
        self.view = view
        self.parent_pid = parent_pid
        self.steps = TrialSteps(config, objective)
        self.notes: list[str] = []
        self.done_before = 0  # trained trials of the finished stages

    def run(self) -> list[str]:
        best = None
        for stage in plan_stages(self.config):
            stage = _fixed_parts(self.config, stage, best)
            study = _open_study(self.storage, self.config, stage)
            self._run_stage(study, stage)
            best = _stage_best(study, self.config)
            self.done_before += count_trials(study.get_trials(deepcopy=False))["evaluated"]
            if best is None:
                raise UserError(
                    f"stage {stage.index + 1} has no completed feasible trial; loosen the "
                    "constraints or raise --trials"
                )
        return self.notes

    def _orphaned(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def _show(self, study: optuna.Study, stage: Stage) -> None:
        if self.view is None:
            return
        trials = study.get_trials(deepcopy=False)
        records = [R.trial_record(t, stage.index, self.config.objective) for t in trials]
        best = R.best_of(records)
        note = f"stage {stage.index + 1}" if self.config.strategy != "one-shot" else ""
        self.view.update(
            self.done_before + count_trials(trials)["evaluated"],
            best["pattern"] if best else None,
            best["score"] if best else None,
            note,
        )

    def _run_stage(self, study: optuna.Study, stage: Stage) -> None:
        space = {
            param_name(stage.offset + i): CategoricalDistribution(list(self.config.primitives))
            for i in range(stage.searched)
        }
        cap = max(50, 5 * stage.trials)
        n_space = len(self.config.primitives) ** stage.searched
        self._show(study, stage)
        while True:
            reap_dead_trials(study)
            trials = study.get_trials(deepcopy=False)
            c = count_trials(trials)
            if c["evaluated"] >= stage.trials:
                return
            if c["cheap"] >= cap:
                self._note(
                    f"stage {stage.index + 1}: stopped after {c['evaluated']} trained "
                    f"trials: {cap} proposals were known or infeasible"
                )
                return
            if c["known_patterns"] >= n_space and c["waiting"] == 0 and c["running"] == 0:
                self._note(f"stage {stage.index + 1}: every pattern of the space is known")
                return
            if c["waiting"] == 0 and c["evaluated"] + c["running"] >= stage.trials:
                time.sleep(POLL)  # the rest of the budget is in flight in other workers
                continue
            if self._orphaned():
                raise SystemExit(1)  # the parent was killed: stop between trials
            trial = study.ask(space)
            # The heartbeat covers the whole trial, so a remote worker's death is noticed.
            with heartbeat(study, trial):
                self.steps.run(study, stage, trial)
            self._show(study, stage)
            if self.feed is not None:
                self.feed.poll()

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            if self.view is not None:
                self.view.message(text)


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message="Clip non-finite values")
    # We run the heartbeat ourselves around ask/tell (Optuna expects optimize()).
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _worker_entry(config_dict, out_dir, url, objective, parent_pid) -> None:
    """A spawned worker process: run the search's stages until the budget is done."""
    import sys

    _quiet_optuna()
    config = SearchConfig.from_dict(config_dict)
    try:
        _Worker(config, out_dir, url, objective, parent_pid=parent_pid).run()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def _progress_from_storage(config: SearchConfig, url: str) -> tuple[int, str | None, float | None]:
    stages = R.load_stage_trials(config, open_storage(url, reader=True))
    done = sum(1 for recs in stages for r in recs if R.is_trained(r))
    best = R.best_of(stages[-1]) if stages else None
    return done, (best or {}).get("pattern"), (best or {}).get("score")


def summarise(config: SearchConfig, out_dir: Path, wall: float, notes: list[str]) -> SearchResult:
    """Read the whole search back, write ``trials.jsonl`` and ``summary.json``."""
    url = storage_url(config.storage, out_dir)
    per_stage = R.load_stage_trials(config, open_storage(url))
    trials = [r for recs in per_stage for r in recs]
    atomic_write_text(SearchDir(out_dir).trials, "".join(json.dumps(r) + "\n" for r in trials))
    plans = plan_stages(config)
    stages = []
    best_pattern = None
    for plan, recs in zip(plans, per_stage):
        stage = _fixed_parts(config, plan, best_pattern)
        states = Counter(r["state"] for r in recs)
        best, best_pattern = R.stage_best(recs, config.objective)
        stages.append({**stage.to_dict(), "states": dict(states), "best": best})
    for plan, recs in zip(plans, per_stage):
        n_done = sum(R.is_trained(r) for r in recs)
        if n_done < plan.trials:
            notes.append(
                f"stage {plan.index + 1}: {n_done} of {plan.trials} trials trained (the sampler "
                "kept proposing known or infeasible patterns, or the space is exhausted)"
            )
    notes = list(dict.fromkeys(n for n in notes if "stopped after" not in n))
    final = stages[-1]["best"] if stages else None
    result = SearchResult(str(out_dir), config, trials, final, stages, wall, notes)
    summary = result.to_dict()
    summary.pop("trials")
    atomic_write_json(SearchDir(out_dir).summary_json, summary)
    return result


def run_search(
    config: SearchConfig,
    out_dir: str | Path,
    objective: Objective | None = None,
    *,
    argv: list[str] | None = None,
    progress: bool = True,
    executor: Executor | None = None,
    report_to: Sequence[str] = (),
) -> SearchResult:
    """Run (or resume) a search into ``out_dir``; returns the trials and the best.

    ``objective(arch, proxy=..., seed=...)`` replaces the proxy evaluator (see
    :mod:`hcomposer.search.objectives`); with ``workers > 1`` it must be picklable (a
    module-level function), since each worker is a spawned process. ``executor`` says
    where evaluations run (:mod:`hcomposer.search.executors`; default: local).
    ``report_to``: experiment trackers that receive each trial (:mod:`hcomposer.search.tracked`).
    """
    out = Path(out_dir)
    objective = resolve_objective(config.proxy, objective, config.proxy_config)
    executor = executor or LocalExecutor()
    if config.pruner != "none" and not executor.reports:
        raise UserError(
            f"--pruner {config.pruner} needs --executor local: a {executor.name} task cannot "
            "report its per-task values to the trial while it runs"
        )
    # Connect first: an unreachable cluster is a UserError before anything is written.
    with executor:
        prepare_run_folder(config, out, argv)
        _quiet_optuna()
        url = storage_url(config.storage, out)
        t0 = time.perf_counter()
        label = f"search {config.sampler}"
        name = "/".join(out.resolve().parts[-2:])
        params = {"search": config.to_dict()}
        with open_tracking(report_to, SearchDir(out).tracking, run_name=name, params=params) as tr:
            feed = TrialFeed(tr, config, url)
            with LiveView(config.trials, enabled=progress, label=label) as view:
                evaluate = executor.wrap(objective)
                if config.workers == 1:
                    notes = _Worker(config, out, url, evaluate, view=view, feed=feed).run()
                elif executor.threads:
                    notes = run_threads(
                        lambda i: _Worker(
                            config, out, url, evaluate, view=view if i == 0 else None,
                            feed=feed if i == 0 else None,
                        ).run(),
                        config.workers,
                    )  # fmt: skip
                else:
                    notes = _run_workers(config, out, url, objective, view, feed)
            feed.poll()  # the trials other workers finished last
            return summarise(config, out, time.perf_counter() - t0, notes)


def _run_workers(config, out: Path, url: str, objective, view: LiveView, feed) -> list[str]:
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=_worker_entry,
            args=(config.to_dict(), str(out), url, objective, os.getpid()),
            name=f"hcomposer-search-{i}",
        )
        for i in range(config.workers)
    ]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            # A busy SQLite file: show the next poll instead.
            with contextlib.suppress(Exception):
                view.update(*_progress_from_storage(config, url))
            feed.poll()
            time.sleep(1.0)
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=30)
        raise
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    view.update(*_progress_from_storage(config, url))
    if any(c == 2 for c in codes):
        raise UserError("a search worker stopped on bad input (see its message above)")
    if any(c != 0 for c in codes):
        raise RuntimeError(f"search workers exited with codes {codes}")
    return []
