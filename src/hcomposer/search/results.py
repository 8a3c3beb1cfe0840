"""Reading a search back: trials as plain dicts, the best trial, the Pareto front.

Trial states in these dicts (``state``):

- ``COMPLETE``: a pattern trained and scored (counts toward ``--trials``);
- ``CACHED``: a pattern proposed again, answered from the log with the earlier trial's
  values (``cached_from``), not trained;
- ``INFEASIBLE``: violates a constraint, not trained (``failure`` says which);
- ``FAIL``: the evaluation raised, the worker died in flight (then a later trial has
  ``retry_of`` = its number), or the trial was surplus to the budget;
- ``PRUNED``: trained part-way and stopped by the pruner (``--pruner``); no score, its last
  intermediate value in ``pruned_value`` (counts toward ``--trials``; a pattern proposed
  again after it is told PRUNED again, role ``pruned-before``, with ``cached_from``);
- ``RUNNING`` / ``WAITING``: in flight, or enqueued to be run again.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hcomposer.config_io import DamagedFolder, read_run_file
from hcomposer.errors import UserError
from hcomposer.runs import SearchDir
from hcomposer.search.space import OBJECTIVES, SearchConfig, plan_stages
from hcomposer.search.storage import check_storage, open_storage, storage_url

__all__ = [
    "study_base",
    "study_name",
    "read_config",
    "trial_record",
    "trial_state",
    "load_trials",
    "load_stage_trials",
    "best_of",
    "pareto_front",
    "stage_best",
    "is_trained",
]


def study_base(config: SearchConfig) -> str:
    """Study-name prefix: a hash of the search's identity (several searches can share a DB)."""
    text = json.dumps(config.identity(), sort_keys=True)
    return "hcomposer-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def study_name(config: SearchConfig, stage: int) -> str:
    return f"{study_base(config)}-stage{stage}"


def read_config(out_dir: str | Path) -> SearchConfig:
    path = SearchDir(out_dir).config
    if not path.is_file():
        raise UserError(f"{str(out_dir)!r} is not a search folder (no {path.name})")
    stored = read_run_file(out_dir, path.name, kind="search", keys=("config",), versioned=True)
    try:
        return SearchConfig.from_dict(stored["config"])
    except UserError as e:
        raise DamagedFolder(
            f"search folder {str(out_dir)!r} is damaged: search.json: {e}; restore it from a "
            "copy, or rerun the same 'hcomposer search' command into a new --out"
        ) from None


def trial_state(t: FrozenTrial) -> str:
    if t.state == TrialState.COMPLETE:
        role = t.user_attrs.get("role", "evaluation")
        return {"cached": "CACHED", "infeasible": "INFEASIBLE"}.get(role, "COMPLETE")
    return t.state.name


def _finite(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def trial_record(t: FrozenTrial, stage: int, objectives: tuple[str, ...]) -> dict[str, Any]:
    """One trial as a plain dict (the contract of ``load_trials``)."""
    a = t.user_attrs
    state = trial_state(t)
    scored = state in ("COMPLETE", "CACHED")
    # Optuna gives a pruned trial its last intermediate value as a value: not a score here.
    values = list(t.values) if t.values is not None and state != "PRUNED" else None
    rec: dict[str, Any] = {
        "number": t.number,
        "stage": stage,
        "pattern": a.get("pattern"),
        "score": _finite(values[0]) if scored and values else None,
        "state": state,
        "values": ({name: _finite(v) for name, v in zip(objectives, values)} if values else None),
        "scores": a.get("scores"),
        "cost": a.get("cost"),
        "wall_seconds": a.get("wall_seconds"),
        "seed": a.get("seed"),
        "proxy": a.get("proxy"),
        "failure": a.get("failure"),
        "cached_from": a.get("cached_from"),
        "retry_of": a.get("retry_of"),
        "retry_reason": a.get("retry_reason"),
        "architecture": a.get("architecture"),
        "owner": a.get("owner"),
        "proxy_result": a.get("proxy_result"),
        "pruned_step": a.get("pruned_step"),
        "pruned_value": a.get("pruned_value"),
        "started": t.datetime_start.isoformat() if t.datetime_start else None,
        "finished": t.datetime_complete.isoformat() if t.datetime_complete else None,
    }
    return rec


def _load_study(storage, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def load_stage_trials(config: SearchConfig, storage) -> list[list[dict[str, Any]]]:
    """Per stage (in order, existing stages only), the trial records."""
    out = []
    for stage in plan_stages(config):
        study = _load_study(storage, study_name(config, stage.index))
        if study is None:
            break
        records = [
            trial_record(t, stage.index, config.objective) for t in study.get_trials(deepcopy=False)
        ]
        # A killed trial's reason lives on its retry (a finished trial is read-only).
        reasons = {r["retry_of"]: r for r in records if r["retry_of"] is not None}
        for r in records:
            if r["state"] == "FAIL" and not r["failure"] and r["number"] in reasons:
                retry = reasons[r["number"]]
                r["failure"] = f"{retry['retry_reason']}; run again as trial {retry['number']}"
        out.append(records)
    return out


def load_trials(
    out_dir: str | Path, stage: int | str | None = "last", storage: str | None = None
) -> list[dict[str, Any]]:
    """The trials of a search folder as dicts (``number``, ``pattern``, ``score``, ``state``...).

    ``stage="last"`` (default) gives the final stage that has started (for one-shot
    searches, all trials); ``None`` every stage; an int that stage (0-based).

    The folder's own ``study.db`` is read by default. A search kept elsewhere (its
    search.json names another storage) is read only from ``storage``, a URL the caller
    got from the user: a folder never decides what gets opened or created outside it.
    """
    config = read_config(out_dir)
    own = SearchDir(out_dir).study_db
    if storage is None:
        if config.storage is not None and config.storage != storage_url(None, out_dir):
            raise UserError(
                f"search folder {str(out_dir)!r} keeps its trials in {config.storage!r}; a "
                "storage named inside a folder is not opened: give it with --storage URL"
            )
        if not own.is_file():
            return []
        url = storage_url(None, out_dir)
    else:
        check_storage(storage, out_dir, must_exist=True)
        url = storage
    try:
        stages = load_stage_trials(config, open_storage(url, reader=True))
    except UserError:
        raise
    except Exception as e:  # a damaged or foreign database: say so, with the way out
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise DamagedFolder(
            f"search folder {str(out_dir)!r}: its study cannot be read ({why}); restore "
            "study.db from a copy, or aggregate DIR/trials.jsonl written when the search ended"
        ) from None
    if not stages:
        return []
    if stage is None:
        return [r for records in stages for r in records]
    if stage == "last":
        return stages[-1]
    if not isinstance(stage, int) or not 0 <= stage < len(stages):
        raise UserError(f"stage {stage!r} does not exist; the search has {len(stages)} stage(s)")
    return stages[stage]


def is_trained(record: dict[str, Any]) -> bool:
    """Whether a trial record spent the budget: trained and scored, or pruned part-way."""
    return record["state"] == "COMPLETE" or (
        record["state"] == "PRUNED" and record.get("cached_from") is None
    )


def best_of(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the highest score (ties: the earliest)."""
    done = [r for r in records if r["state"] == "COMPLETE" and r["score"] is not None]
    if not done:
        return None
    return min(done, key=lambda r: (-r["score"], r["number"]))


def stage_best(records: list[dict[str, Any]], objectives: tuple[str, ...]) -> tuple[Any, Any]:
    """``(result, pattern)`` of a stage: the Pareto front (several objectives) or the best
    trial, and the pattern the next stage builds on (None when nothing completed)."""
    if len(objectives) > 1:
        front = pareto_front(records, objectives)
        return front, front[0]["pattern"] if front else None
    best = best_of(records)
    return best, best["pattern"] if best else None


def pareto_front(records: list[dict[str, Any]], objectives: tuple[str, ...]) -> list[dict]:
    """Non-dominated completed trials over ``objectives``, best score first."""
    signs = [1.0 if OBJECTIVES[o] == "maximize" else -1.0 for o in objectives]
    pts = []
    for r in records:
        if r["state"] != "COMPLETE" or not r["values"]:
            continue
        vals = [r["values"].get(o) for o in objectives]
        if any(v is None for v in vals):
            continue
        pts.append((r, [s * v for s, v in zip(signs, vals)]))

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    front = [r for r, v in pts if not any(dominates(w, v) for _, w in pts)]
    # One entry per distinct point: equal patterns/values would repeat the same design.
    seen, out = set(), []
    for r in sorted(front, key=lambda r: (-r["score"], r["number"])):
        key = r["pattern"]
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out
