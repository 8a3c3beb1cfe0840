"""Architecture search: a search space of sublayer slots, Optuna samplers, strategies.

``run_search(SearchConfig(...), out_dir)`` runs or resumes a search; ``load_trials``
reads one back; ``make_sampler`` gives the samplers to other tools (bench-search).
"""

from hcomposer.search.loop import SearchResult, load_trials, run_search
from hcomposer.search.samplers import SAMPLERS, make_sampler
from hcomposer.search.space import OBJECTIVES, STRATEGIES, SearchConfig

__all__ = [
    "SAMPLERS",
    "OBJECTIVES",
    "STRATEGIES",
    "SearchConfig",
    "SearchResult",
    "make_sampler",
    "run_search",
    "load_trials",
]
