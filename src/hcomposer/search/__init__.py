"""Architecture search: a search space of sublayer slots, Optuna samplers, strategies."""

from hcomposer.search.samplers import SAMPLERS, make_sampler

__all__ = ["SAMPLERS", "make_sampler"]
