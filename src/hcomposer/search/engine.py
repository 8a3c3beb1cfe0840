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
- an objective that raises or returns a non-finite score fails the trial (``FAIL``).

Cheap proposals (cached, infeasible, failed-before) are capped at
``max(50, 5 x stage trials)`` per stage, so a sampler that has converged, or tight
constraints, end the search early with a note instead of looping.

Resuming: a RUNNING trial whose worker is gone is failed and its pattern enqueued
again (see :mod:`hcomposer.search.storage`). Workers agree on the budget through the
trial numbers the storage hands out: a trial is trained only if fewer than ``--trials``
trials with smaller numbers are trained or may still be.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState

from hcomposer.architecture import Architecture
from hcomposer.config_io import read_run_file, stamp
from hcomposer.errors import UserError
from hcomposer.io import atomic_write_json, atomic_write_text, record_run
from hcomposer.search import results as R
from hcomposer.search.live import LiveView
from hcomposer.search.objectives import Objective, check_proxy, normalise_result, resolve_objective
from hcomposer.search.samplers import default_n_startup, make_sampler
from hcomposer.search.space import (
    SearchConfig,
    Stage,
    constraint_values,
    describe_violation,
    param_name,
    plan_stages,
    split_pattern,
    stage_pattern,
)
from hcomposer.search.storage import (
    check_storage,
    open_storage,
    owner_record,
    reap_dead_trials,
    storage_url,
)

__all__ = ["SearchResult", "run_search", "prepare_run_folder", "load_trials"]

load_trials = R.load_trials
_POLL = 0.5


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
    out = Path(out_dir)
    check_proxy(config.proxy)
    plan_stages(config)  # a budget the space cannot hold is refused before anything is written
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder")
    existing = out / "search.json"
    resuming = existing.is_file()
    if resuming:
        try:
            stored = read_run_file(
                out, "search.json", kind="search", keys=("config",), versioned=True
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
    elif (out / "study.db").exists():
        raise UserError(f"{str(out)!r} holds a study.db without search.json; pick a new --out")
    check_storage(config.storage, out)
    out.mkdir(parents=True, exist_ok=True)
    # Create the storage's tables before search.json exists: readers (load_trials, other
    # workers) wait for search.json, so they never race this creation.
    open_storage(storage_url(config.storage, out))
    if not resuming:
        atomic_write_json(existing, stamp({"config": config.to_dict()}))
    record_run(out, config.to_dict(), argv)
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
    if len(config.objective) > 1:
        front = R.pareto_front(records, config.objective)
        return front[0]["pattern"] if front else None
    best = R.best_of(records)
    return best["pattern"] if best else None


class _Costs:
    """Costs at the search shape, once per pattern per process (meta device, no memory)."""

    def __init__(self) -> None:
        self._cache: dict[str, dict[str, Any]] = {}

    def __call__(self, arch: Architecture) -> dict[str, Any]:
        if arch.pattern not in self._cache:
            from hcomposer.accounting import count_costs

            c = count_costs(arch)
            self._cache[arch.pattern] = {
                "params_total": c.params_total,
                "params_active": c.params_active,
                "params_non_embedding": c.params_non_embedding,
                "flops_per_token": c.flops_per_token,
                "kv_bytes_per_token": c.kv_bytes_per_token,
                "state_bytes": c.state_bytes,
                "seq_len": c.seq_len,
            }
        return self._cache[arch.pattern]


def _token_counts(arch: Architecture) -> dict[str, int]:
    # A group [A|S] counts toward both A and S.
    return dict(Counter(tok for sub in arch.layers for tok in sub))


class _Worker:
    """Runs the stages of one search in one process, sharing the storage with others."""

    def __init__(self, config, out_dir, url, objective, view=None, parent_pid=None):
        self.config: SearchConfig = config
        self.out = Path(out_dir)
        self.storage = open_storage(url)
        self.objective = objective
        self.view = view
        self.parent_pid = parent_pid
        self.costs = _Costs()
        self.notes: list[str] = []
        self.done_before = 0  # trained trials of the finished stages

    def run(self) -> list[str]:
        best = None
        for stage in plan_stages(self.config):
            stage = _fixed_parts(self.config, stage, best)
            study = _open_study(self.storage, self.config, stage)
            self._run_stage(study, stage)
            best = _stage_best(study, self.config)
            self.done_before += _count(study.get_trials(deepcopy=False))["evaluated"]
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
            self.done_before + _count(trials)["evaluated"],
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
            c = _count(trials)
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
                time.sleep(_POLL)  # the rest of the budget is in flight in other workers
                continue
            if self._orphaned():
                raise SystemExit(1)  # the parent was killed: stop between trials
            trial = study.ask(space)
            # The heartbeat covers the whole trial, so a remote worker's death is noticed.
            with get_heartbeat_thread(trial._trial_id, study._storage):
                self._handle(study, stage, trial)
            self._show(study, stage)

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            if self.view is not None:
                self.view.message(text)

    def _handle(self, study: optuna.Study, stage: Stage, trial: optuna.Trial) -> None:
        cfg = self.config
        trial.set_user_attr("owner", owner_record())
        pattern = stage_pattern(stage, trial.params)
        arch = Architecture(pattern=pattern, shape=cfg.shape)
        trial.set_user_attr("pattern", arch.pattern)
        trial.set_user_attr("seed", cfg.seed)
        trial.set_user_attr("proxy", cfg.proxy)
        try:
            costs = self.costs(arch)
        except Exception as e:  # a pattern the model builder rejects is a failed trial
            self._fail(
                study, trial, "evaluation", f"cost accounting failed: {type(e).__name__}: {e}"
            )
            return
        trial.set_user_attr("cost", costs)
        cons = constraint_values(cfg, costs, _token_counts(arch))
        for name, value in cons.items():
            trial.set_constraint(name, value)
        if any(v > 0 for v in cons.values()):
            reason = describe_violation(cons, cfg, costs, _token_counts(arch))
            trial.set_user_attr("role", "infeasible")
            trial.set_user_attr("failure", reason)
            study.tell(trial, self._values(-math.inf, None, costs, infeasible=True))
            return
        while True:
            known = _known(study, arch.pattern, trial.number)
            if known is not _PENDING and (known is None or known.state != TrialState.RUNNING):
                break
            # Another worker trains (or may train) this very pattern: wait for its result.
            reap_dead_trials(study)
            time.sleep(_POLL / 5 if known is _PENDING else _POLL)
        if known is not None and known.state == TrialState.COMPLETE:
            trial.set_user_attr("role", "cached")
            trial.set_user_attr("cached_from", known.number)
            for key in ("scores", "wall_seconds", "proxy_result"):
                if key in known.user_attrs:
                    trial.set_user_attr(key, known.user_attrs[key])
            study.tell(trial, list(known.values))
            return
        if known is not None and "retry_of" not in trial.user_attrs:
            trial.set_user_attr("role", "failed-before")
            why = known.user_attrs.get("failure", "failed")
            self._fail(
                study, trial, "failed-before", f"failed before in trial {known.number}: {why}"
            )
            return
        if _budget_used(study, trial.number) >= stage.trials:
            self._fail(study, trial, "surplus", "surplus: the budget was filled by other workers")
            return
        trial.set_user_attr("role", "evaluation")
        trial.set_user_attr("architecture", arch.to_dict())
        self._evaluate(study, trial, arch, costs)

    def _values(self, score: float, tps: float | None, costs: dict, infeasible=False) -> list:
        values = []
        for name in self.config.objective:
            if name == "score":
                values.append(score)
            elif name == "kv":
                values.append(float(costs["kv_bytes_per_token"]))
            elif name == "flops":
                values.append(float(costs["flops_per_token"]))
            elif name == "throughput":
                values.append(-math.inf if infeasible or tps is None else float(tps))
        return values

    def _fail(self, study, trial, role: str, reason: str) -> None:
        trial.set_user_attr("role", role)
        trial.set_user_attr("failure", reason[:500])
        study.tell(trial, state=TrialState.FAIL)

    def _evaluate(self, study, trial, arch: Architecture, costs: dict) -> None:
        t0 = time.perf_counter()
        try:
            result = self.objective(arch, proxy=self.config.proxy, seed=self.config.seed)
            outcome = normalise_result(result)
        except UserError as e:
            self._fail(study, trial, "evaluation", f"{e}")
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("failure", "interrupted")
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(
                dict(trial.params),
                user_attrs={"retry_of": trial.number, "retry_reason": "interrupted"},
            )
            raise
        except Exception as e:
            tb = traceback.format_exc(limit=6)
            trial.set_user_attr("traceback", tb[-4000:])
            self._fail(study, trial, "evaluation", f"{type(e).__name__}: {e}")
            return
        wall = time.perf_counter() - t0
        trial.set_user_attr("wall_seconds", round(wall, 4))
        if outcome.details:
            trial.set_user_attr("proxy_result", _jsonable(outcome.details))
        if not math.isfinite(outcome.score):
            self._fail(study, trial, "evaluation", f"score is {outcome.score} (diverged?)")
            return
        values = self._values(outcome.score, outcome.tokens_per_second, costs)
        scores = dict(zip(self.config.objective, values))
        if outcome.tokens_per_second is not None:
            scores["tokens_per_second"] = outcome.tokens_per_second
        trial.set_user_attr("scores", scores)
        study.tell(trial, values)


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _count(trials: list[FrozenTrial]) -> dict[str, int]:
    c = Counter()
    patterns = set()
    for t in trials:
        role = t.user_attrs.get("role")
        if t.state == TrialState.COMPLETE and role == "evaluation":
            c["evaluated"] += 1
        elif t.state == TrialState.COMPLETE or role in ("failed-before",):
            c["cheap"] += 1
        if t.state == TrialState.RUNNING:
            c["running"] += 1
        elif t.state == TrialState.WAITING:
            c["waiting"] += 1
        known_roles = ("evaluation", "infeasible", "cached", "failed-before")
        if t.state.is_finished() and role in known_roles and "pattern" in t.user_attrs:
            patterns.add(t.user_attrs["pattern"])
    c["known_patterns"] = len(patterns)
    return c


_PENDING = object()


def _known(study: optuna.Study, pattern: str, number: int) -> Any:
    """What the log says about ``pattern``, from the other trials of this stage.

    The earliest completed training of it; else a lower-numbered trial in flight on it, or
    one not yet classified (``_PENDING``: its worker is still drawing or checking it, wait
    to avoid training the same pattern twice); else a real failure on it; else None.
    """
    running = failed = None
    pending = False
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            continue
        role = t.user_attrs.get("role")
        if t.state == TrialState.RUNNING and t.number < number and role is None:
            if "pattern" not in t.user_attrs or t.user_attrs["pattern"] == pattern:
                pending = True
            continue
        if t.user_attrs.get("pattern") != pattern or role != "evaluation":
            continue
        if t.state == TrialState.COMPLETE:
            return t
        if t.state == TrialState.RUNNING and t.number < number:
            running = t
        # A trial killed in flight is run again elsewhere; only real failures count.
        elif t.state == TrialState.FAIL and t.user_attrs.get("failure") and failed is None:
            failed = None if _was_retried(study, t.number) else t
    if running is not None:
        return running
    return _PENDING if pending else failed


def _was_retried(study: optuna.Study, number: int) -> bool:
    return any(t.user_attrs.get("retry_of") == number for t in study.get_trials(deepcopy=False))


def _budget_used(study: optuna.Study, number: int) -> int:
    """Trials numbered below ``number`` that are trained, or in flight and may be."""
    used = 0
    for t in study.get_trials(deepcopy=False):
        if t.number >= number:
            continue
        role = t.user_attrs.get("role")
        if (
            t.state == TrialState.COMPLETE
            and role == "evaluation"
            or t.state == TrialState.RUNNING
            and role in (None, "evaluation")
        ):
            used += 1
    return used


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
    done = sum(1 for recs in stages for r in recs if r["state"] == "COMPLETE")
    best = R.best_of(stages[-1]) if stages else None
    return done, (best or {}).get("pattern"), (best or {}).get("score")


def summarise(config: SearchConfig, out_dir: Path, wall: float, notes: list[str]) -> SearchResult:
    """Read the whole search back, write ``trials.jsonl`` and ``summary.json``."""
    import json

    url = storage_url(config.storage, out_dir)
    per_stage = R.load_stage_trials(config, open_storage(url))
    trials = [r for recs in per_stage for r in recs]
    atomic_write_text(out_dir / "trials.jsonl", "".join(json.dumps(r) + "\n" for r in trials))
    plans = plan_stages(config)
    stages = []
    best_pattern = None
    for plan, recs in zip(plans, per_stage):
        stage = _fixed_parts(config, plan, best_pattern)
        states = Counter(r["state"] for r in recs)
        if len(config.objective) > 1:
            front = R.pareto_front(recs, config.objective)
            best = front
            best_pattern = front[0]["pattern"] if front else None
        else:
            b = R.best_of(recs)
            best = b
            best_pattern = b["pattern"] if b else None
        stages.append({**stage.to_dict(), "states": dict(states), "best": best})
    for plan, recs in zip(plans, per_stage):
        n_done = sum(r["state"] == "COMPLETE" for r in recs)
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
    atomic_write_json(out_dir / "summary.json", summary)
    return result


def run_search(
    config: SearchConfig,
    out_dir: str | Path,
    objective: Objective | None = None,
    *,
    argv: list[str] | None = None,
    progress: bool = True,
) -> SearchResult:
    """Run (or resume) a search into ``out_dir``; returns the trials and the best.

    ``objective(arch, proxy=..., seed=...)`` replaces the proxy evaluator (see
    :mod:`hcomposer.search.objectives`); with ``workers > 1`` it must be picklable (a
    module-level function), since each worker is a spawned process.
    """
    out = Path(out_dir)
    objective = resolve_objective(config.proxy, objective, config.proxy_config)
    prepare_run_folder(config, out, argv)
    _quiet_optuna()
    url = storage_url(config.storage, out)
    t0 = time.perf_counter()
    notes: list[str] = []
    with LiveView(config.trials, enabled=progress, label=f"search {config.sampler}") as view:
        if config.workers == 1:
            notes = _Worker(config, out, url, objective, view=view).run()
        else:
            notes = _run_workers(config, out, url, objective, view)
    return summarise(config, out, time.perf_counter() - t0, notes)


def _run_workers(config, out: Path, url: str, objective, view: LiveView) -> list[str]:
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
