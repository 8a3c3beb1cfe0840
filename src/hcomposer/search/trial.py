"""One trial's steps: record it, price it, check the constraints, reuse what the log knows
about its pattern, and only then train and score it.

A trial ends in one of these roles (``user_attrs["role"]``): ``infeasible`` (a constraint
failed; told -inf), ``cached`` (the pattern was trained before; its values are copied),
``failed-before`` (it failed before), ``pruned-before`` (it was pruned before; told PRUNED
again), ``surplus`` (other workers filled the budget), ``evaluation`` (trained here: scored,
or stopped by the pruner and stored as ``PRUNED`` with ``pruned_step``/``pruned_value``).

With a pruner (``--pruner median|hyperband``) the objective gets a ``report(step, value)``
hook: each value goes to ``trial.report`` and the hook answers ``trial.should_prune()``;
the objective stops by raising :class:`~hcomposer.proxies.proxy.ProxyPruned` (or
``optuna.TrialPruned``).
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections import Counter
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.errors import UserError
from hcomposer.proxies.proxy import ProxyPruned, Report
from hcomposer.search.budget import POLL
from hcomposer.search.claims import claim
from hcomposer.search.dashboard import task_scores
from hcomposer.search.objectives import Objective, normalise_result
from hcomposer.search.space import (
    SearchConfig,
    Stage,
    constraint_values,
    describe_violation,
    stage_pattern,
)
from hcomposer.search.storage import owner_record, reap_dead_trials

__all__ = ["TrialSteps"]


class TrialSteps:
    """Runs asked trials of one search in this process (costs cached per pattern)."""

    def __init__(self, config: SearchConfig, objective: Objective):
        self.config = config
        self.objective = objective
        self._costs: dict[str, dict[str, Any]] = {}

    def run(self, study: optuna.Study, stage: Stage, trial: optuna.Trial) -> None:
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
        if self._infeasible(study, trial, arch, costs):
            return
        verdict, known = claim(
            study,
            trial,
            arch.pattern,
            stage.trials,
            poll=POLL,
            on_wait=lambda: reap_dead_trials(study),
        )
        if verdict == "cached":
            trial.set_user_attr("role", "cached")
            trial.set_user_attr("cached_from", known.number)
            for key in ("scores", "task_scores", "wall_seconds", "proxy_result"):
                if key in known.user_attrs:
                    trial.set_user_attr(key, known.user_attrs[key])
            study.tell(trial, list(known.values))
            return
        if verdict == "pruned":
            # Pruned before: the pruner's verdict stands (no training, no score).
            trial.set_user_attr("role", "pruned-before")
            trial.set_user_attr("cached_from", known.number)
            for key in ("pruned_step", "pruned_value"):
                if key in known.user_attrs:
                    trial.set_user_attr(key, known.user_attrs[key])
            study.tell(trial, state=TrialState.PRUNED)
            return
        if verdict == "failed":
            trial.set_user_attr("role", "failed-before")
            why = known.user_attrs.get("failure", "failed")
            self._fail(
                study, trial, "failed-before", f"failed before in trial {known.number}: {why}"
            )
            return
        if verdict == "surplus":
            self._fail(study, trial, "surplus", "surplus: the budget was filled by other workers")
            return
        trial.set_user_attr("architecture", arch.to_dict())
        self._evaluate(study, trial, arch, costs)

    def costs(self, arch: Architecture) -> dict[str, Any]:
        """Costs at the search shape, once per pattern per process (meta device, no memory)."""
        if arch.pattern not in self._costs:
            c = count_costs(arch)
            self._costs[arch.pattern] = {
                "params_total": c.params_total,
                "params_active": c.params_active,
                "params_non_embedding": c.params_non_embedding,
                "flops_per_token": c.flops_per_token,
                "kv_bytes_per_token": c.kv_bytes_per_token,
                "state_bytes": c.state_bytes,
                "seq_len": c.seq_len,
            }
        return self._costs[arch.pattern]

    def _infeasible(self, study, trial, arch: Architecture, costs: dict) -> bool:
        cfg = self.config
        # A group [A|S] counts toward both A and S.
        counts = dict(Counter(tok for sub in arch.layers for tok in sub))
        cons = constraint_values(cfg, costs, counts)
        for name, value in cons.items():
            trial.set_constraint(name, value)
        if not any(v > 0 for v in cons.values()):
            return False
        trial.set_user_attr("role", "infeasible")
        trial.set_user_attr("failure", describe_violation(cons, cfg, costs, counts))
        study.tell(trial, self._values(-math.inf, None, costs, infeasible=True))
        return True

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
        kwargs: dict[str, Any] = {}
        last: dict[str, Any] = {}
        if self.config.pruner != "none":
            kwargs["report"] = _reporter(trial, last)
        try:
            result = self.objective(arch, proxy=self.config.proxy, seed=self.config.seed, **kwargs)
            outcome = normalise_result(result)
        except (ProxyPruned, optuna.TrialPruned) as e:
            try:
                self._pruned(study, trial, e, last, time.perf_counter() - t0)
            except UpdateFinishedTrialError:
                return  # reaped while it ran: the retry owns the pattern (as below)
            return
        except UpdateFinishedTrialError:
            # Raised by the report hook: the trial was declared dead and re-queued while it
            # ran (see below); the retry owns the pattern.
            return
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
        try:
            self._record(study, trial, outcome, costs, time.perf_counter() - t0)
        except UpdateFinishedTrialError:
            # Declared dead while it ran (no heartbeat within the grace period, e.g. on an
            # overloaded machine) and already failed and re-queued by another worker: the
            # retry owns the pattern now, so this late result is dropped, never told twice.
            return

    def _record(self, study, trial, outcome, costs: dict, wall: float) -> None:
        trial.set_user_attr("wall_seconds", round(wall, 4))
        if outcome.details:
            trial.set_user_attr("proxy_result", _jsonable(outcome.details))
            if task_scores(outcome.details):
                trial.set_user_attr("task_scores", _jsonable(task_scores(outcome.details)))
        if not math.isfinite(outcome.score):
            self._fail(study, trial, "evaluation", f"score is {outcome.score} (diverged?)")
            return
        values = self._values(outcome.score, outcome.tokens_per_second, costs)
        scores = dict(zip(self.config.objective, values))
        if outcome.tokens_per_second is not None:
            scores["tokens_per_second"] = outcome.tokens_per_second
        trial.set_user_attr("scores", scores)
        study.tell(trial, values)

    def _pruned(self, study, trial, e: Exception, last: dict, wall: float) -> None:
        # Stored as PRUNED, never as a score: the last intermediate value is a user attr only.
        trial.set_user_attr("wall_seconds", round(wall, 4))
        step = getattr(e, "step", last.get("step"))
        value = getattr(e, "value", last.get("value"))
        if step is not None:
            trial.set_user_attr("pruned_step", int(step))
        if value is not None:
            trial.set_user_attr("pruned_value", float(value))
        study.tell(trial, state=TrialState.PRUNED)


def _reporter(trial: optuna.Trial, last: dict) -> Report:
    """The proxy's ``report(step, value) -> bool`` hook for one trial: record the value with
    Optuna (and in ``last``) and ask the study's pruner whether to stop."""

    def report(step: int, value: float) -> bool:
        trial.report(float(value), int(step))
        last.update(step=int(step), value=float(value))
        return trial.should_prune()

    return report


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
