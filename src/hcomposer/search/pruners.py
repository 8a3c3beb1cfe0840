"""Pruners: stop a trial whose proxy is doing worse than the others part-way through.

The proxy reports an intermediate value after each task (the mean accuracy of the tasks run
so far, in a fixed task order; see ``hcomposer.proxies.proxy.evaluate_proxy``). The trial's
steps pass those values to ``trial.report`` and ask ``trial.should_prune``; a pruned trial is
stored as Optuna's ``PRUNED`` (never as a score) and counts toward ``--trials``.

- ``none``: no pruning;
- ``median``: :class:`optuna.pruners.MedianPruner` (prune below the median of the earlier
  trials' values at the same step; the first 5 trials are never pruned);
- ``hyperband``: :class:`optuna.pruners.HyperbandPruner` (successive halving brackets,
  resource = tasks; the largest resource is read from the first finished trial).
"""

from __future__ import annotations

import optuna

from hcomposer.errors import UserError

__all__ = ["PRUNERS", "make_pruner"]

PRUNERS: dict[str, str] = {
    "none": "no pruning: every trial runs all its tasks",
    "median": "optuna MedianPruner: stop below the median of earlier trials at that task",
    "hyperband": "optuna HyperbandPruner: successive-halving brackets over the tasks",
}


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """The Optuna pruner of ``--pruner NAME``."""
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    raise UserError(f"unknown pruner {name!r}; choose one of: {', '.join(PRUNERS)}")
