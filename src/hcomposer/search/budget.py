"""The budget shared by the workers of one search, read from the trial log.

Every worker decides from the same Optuna storage: how many trials are trained or in flight
(the budget), whether a pattern is already known (trained, failing, or being trained by
another worker), and how long to wait for one in flight. Nothing is kept in memory, so a
worker that starts late, or after a kill, takes the same decisions.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hcomposer.search.storage import reap_dead_trials

__all__ = ["POLL", "PENDING", "count_trials", "known", "budget_used", "wait_for_known"]

POLL = 0.5  # seconds between two looks at the log while waiting for other workers

# A lower-numbered trial not yet classified: its worker is still drawing or checking it.
PENDING = object()

# Roles a finished trial can have that make its pattern known to the search.
_KNOWN_ROLES = ("evaluation", "infeasible", "cached", "failed-before")


def count_trials(trials: list[FrozenTrial]) -> dict[str, int]:
    """Trained ("evaluated"), cheap (cached, infeasible, failed before), running and waiting
    trials, and the number of distinct known patterns."""
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
        if t.state.is_finished() and role in _KNOWN_ROLES and "pattern" in t.user_attrs:
            patterns.add(t.user_attrs["pattern"])
    c["known_patterns"] = len(patterns)
    return c


def known(study: optuna.Study, pattern: str, number: int) -> Any:
    """What the log says about ``pattern``, from the other trials of this stage.

    The earliest completed training of it; else a lower-numbered trial in flight on it, or
    one not yet classified (``PENDING``: wait, to avoid training the same pattern twice);
    else a real failure on it; else None.
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
    return PENDING if pending else failed


def wait_for_known(study: optuna.Study, pattern: str, number: int) -> FrozenTrial | None:
    """:func:`known`, once no other worker trains (or may train) ``pattern`` any more."""
    while True:
        found = known(study, pattern, number)
        if found is not PENDING and (found is None or found.state != TrialState.RUNNING):
            return found
        # A dead worker's trial is failed and enqueued again, so the wait ends.
        reap_dead_trials(study)
        time.sleep(POLL / 5 if found is PENDING else POLL)


def _was_retried(study: optuna.Study, number: int) -> bool:
    return any(t.user_attrs.get("retry_of") == number for t in study.get_trials(deepcopy=False))


def budget_used(study: optuna.Study, number: int) -> int:
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
