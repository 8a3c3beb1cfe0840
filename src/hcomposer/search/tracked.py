"""A search's trials sent to the experiment trackers (``--report-to``), each trial once.

Every trial that spent the budget (trained, or pruned part-way) goes out at the next step
(1, 2, ...) in the order the feed sees it finish, whichever worker ran it: its score and each
objective, its wall time, its parameters (one slot per sublayer) and its pattern. W&B and
MLflow get it through optuna-integration's callbacks (``WeightsAndBiasesCallback`` into the
search's W&B run; ``MLflowCallback``: one MLflow run per trial, a child of the search's run,
the pattern among its tags); TensorBoard and Trackio as metrics ``trial/...`` and the pattern as
text. The main process polls the study (after each of its own trials, and while other
workers run); the trials sent are kept in the tracking state, so a resumed search sends only
the new ones.
"""

from __future__ import annotations

import copy

import optuna

from hcomposer.search import results as R
from hcomposer.search.space import SearchConfig, plan_stages
from hcomposer.search.storage import open_storage
from hcomposer.tracking import Tracking

__all__ = ["TrialFeed"]


class TrialFeed:
    """Polls a search's storage and sends each new finished trial to ``tracking``."""

    def __init__(self, tracking: Tracking, config: SearchConfig, url: str):
        self.tracking, self.config, self.url = tracking, config, url
        self.sent: list[str] = list(tracking.state.get("search_trials", []))
        self.storage = open_storage(url) if tracking else None

    def poll(self) -> None:
        if not self.tracking:
            return
        names = list(self.config.objective)
        new = False
        for stage in plan_stages(self.config):
            try:
                study = optuna.load_study(
                    study_name=R.study_name(self.config, stage.index), storage=self.storage
                )
            except KeyError:  # the stage has not started
                break
            for t in study.get_trials(deepcopy=False):
                rec = R.trial_record(t, stage.index, self.config.objective)
                key = f"{stage.index}:{t.number}"
                if key in self.sent or not R.is_trained(rec):
                    continue
                self.sent.append(key)
                step = len(self.sent)
                metrics = {f"trial/{k}": v for k, v in (rec["values"] or {}).items()}
                metrics.update({"trial/stage": stage.index, "trial/number": t.number,
                                "trial/wall_seconds": rec["wall_seconds"]})  # fmt: skip
                if rec["score"] is not None:
                    metrics["trial/score"] = rec["score"]
                # The callbacks log at the trial's number: the feed's step, which only grows.
                trial = copy.copy(t)
                trial.number = step
                texts = {"trial/pattern": str(rec["pattern"]), "trial/state": rec["state"]}
                self.tracking.log_trial(study, trial, step, metrics, texts, names)
                new = True
        if new:
            self.tracking.state["search_trials"] = self.sent
            self.tracking.save()
