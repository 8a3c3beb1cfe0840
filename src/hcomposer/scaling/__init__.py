"""Scaling experiments: IsoFLOP sweeps and compute-optimal frontiers (``hcomposer scaling``)."""

from hcomposer.scaling.fits import (
    BudgetFit,
    Frontier,
    Parabola,
    PowerLaw,
    fit_budget,
    fit_frontier,
    fit_parabola,
    fit_power_law,
)
from hcomposer.scaling.ladder import Ladder, PlannedRun, pattern_block, plan_runs, shape_for
from hcomposer.scaling.sweep import RECIPES, SweepConfig, get_recipe, plan_sweep, run_sweep

__all__ = [
    "BudgetFit",
    "Frontier",
    "Parabola",
    "PowerLaw",
    "fit_budget",
    "fit_frontier",
    "fit_parabola",
    "fit_power_law",
    "Ladder",
    "PlannedRun",
    "pattern_block",
    "plan_runs",
    "shape_for",
    "RECIPES",
    "SweepConfig",
    "get_recipe",
    "plan_sweep",
    "run_sweep",
]
