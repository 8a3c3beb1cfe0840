"""Named experiment recipes: plain Python functions returning typed configs.

``RECIPES[name]()`` gives a :class:`~hcomposer.search.SearchConfig`; command-line flags
override single fields (``hcomposer search --recipe paper --trials 50``).
"""

from __future__ import annotations

from collections.abc import Callable

from hcomposer.errors import UserError
from hcomposer.search.space import SearchConfig

__all__ = ["RECIPES", "get_recipe", "quickstart", "paper"]


def quickstart() -> SearchConfig:
    """A first search on a laptop CPU: MAD proxy, proxy shape, A/F/S over 6 positions.

    The MAD proxy trains on one thread per evaluation, so two workers use both cores of
    a small machine. To keep the whole ``hcomposer run`` near ten minutes, each trial
    scores three of MAD's six tasks (recall, selective copying, memorisation: what
    separates attention, Mamba and MLP) with the proxy's calibrated defaults (one
    learning rate, early stop; ``docs/proxies.md``): about 30 CPU-seconds a trial.
    ``hcomposer search --proxy mad`` without a recipe uses all six.
    """
    return SearchConfig(
        primitives=("A", "F", "S"),
        layers=6,
        trials=12,
        sampler="gp",
        n_startup=4,
        workers=2,
        strategy="one-shot",
        proxy="mad:in_context_recall,selective_copying,memorization",
        shape="proxy",
        objective=("score",),
        seed=0,
    )


def paper() -> SearchConfig:
    """Composer's 16-position search (arXiv 2510.00379): A/F only, about 100 GP trials."""
    return SearchConfig(
        primitives=("A", "F"),
        layers=16,
        trials=100,
        sampler="gp",
        strategy="one-shot",
        proxy="mad",
        shape="proxy",
        objective=("score",),
        seed=0,
    )


RECIPES: dict[str, Callable[[], SearchConfig]] = {"quickstart": quickstart, "paper": paper}


def get_recipe(name: str) -> SearchConfig:
    """A recipe's config by name; an unknown name lists the recipes."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    return RECIPES[name]()
