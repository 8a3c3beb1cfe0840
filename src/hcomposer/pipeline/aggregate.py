"""Stage ``aggregate``: the search's top trials voted into one pattern."""

from __future__ import annotations

from hcomposer.io import atomic_write_json
from hcomposer.pipeline.state import State
from hcomposer.recipes import Recipe
from hcomposer.scaling.aggregate import aggregate_details
from hcomposer.search import load_trials

__all__ = ["stage_aggregate"]


def stage_aggregate(state: State, recipe: Recipe) -> dict:
    trials = load_trials(state.dir.search.root)
    agg = aggregate_details(trials, method=recipe.aggregate_method, c=recipe.aggregate_c)
    atomic_write_json(state.dir.aggregate, agg.to_dict())
    return state.finish("aggregate", {"pattern": agg.pattern, "method": agg.method})
