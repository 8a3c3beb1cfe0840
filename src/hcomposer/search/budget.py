"""Counting the trials of one search's log (the live view, the summary and the cheap-proposal
cap read it). Who trains a pattern, and whether the budget still has room, is decided under
the study's lock in :mod:`hcomposer.search.claims`.
"""

from __future__ import annotations

from collections import Counter

from optuna.trial import FrozenTrial, TrialState

__all__ = ["POLL", "count_trials"]

POLL = 0.5  # seconds between two looks at the log while waiting for other workers

# Roles a finished trial can have that make its pattern known to the search.
_KNOWN_ROLES = ("evaluation", "infeasible", "cached", "failed-before", "pruned-before")


def _trained(t: FrozenTrial) -> bool:
    """A trial that trained here: scored (COMPLETE) or stopped by the pruner (PRUNED). Both
    spent the budget, so both count toward ``--trials``, and a resumed search never re-runs
    them."""
    return t.user_attrs.get("role") == "evaluation" and t.state in (
        TrialState.COMPLETE,
        TrialState.PRUNED,
    )


def count_trials(trials: list[FrozenTrial]) -> dict[str, int]:
    """Trained ("evaluated": scored or pruned), cheap (cached, infeasible, failed or pruned
    before), running and waiting trials, and the number of distinct known patterns."""
    c = Counter()
    patterns = set()
    for t in trials:
        role = t.user_attrs.get("role")
        if _trained(t):
            c["evaluated"] += 1
        elif t.state == TrialState.COMPLETE or role in ("failed-before", "pruned-before"):
            c["cheap"] += 1
        if t.state == TrialState.RUNNING:
            c["running"] += 1
        elif t.state == TrialState.WAITING:
            c["waiting"] += 1
        if t.state.is_finished() and role in _KNOWN_ROLES and "pattern" in t.user_attrs:
            patterns.add(t.user_attrs["pattern"])
    c["known_patterns"] = len(patterns)
    return c
