"""Samplers for the architecture search, all Optuna samplers in their real mode.

``make_sampler(name, seed)`` returns:

- ``gp``: :class:`optuna.samplers.GPSampler` (Bayesian optimisation with a Gaussian
  process and log expected improvement; categorical slots use its native categorical
  kernel), the default as in Composer;
- ``tpe``: multivariate :class:`optuna.samplers.TPESampler` with the constant liar, so
  parallel workers do not pile onto one proposal;
- ``random``: :class:`optuna.samplers.RandomSampler`;
- ``evolution``: :class:`RegularizedEvolutionSampler` (Real et al. 2019, aging evolution)
  for one objective, :class:`optuna.samplers.NSGAIISampler` for several.

Every sampler is wrapped in :class:`TrialSeededSampler`, which reseeds the wrapped
sampler's random streams from ``(seed, trial.number)`` before each trial. A proposal is
then a function of the seed, the trial number and the trial log only: a resumed search
or a second worker proposes what one uninterrupted process would have proposed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hcomposer.errors import UserError
from hcomposer.search.optuna_compat import LazyRandomState, forget_gp_cache

__all__ = [
    "SAMPLERS",
    "make_sampler",
    "default_n_startup",
    "TrialSeededSampler",
    "RegularizedEvolutionSampler",
    "derive_seed",
]

SAMPLERS: dict[str, str] = {
    "gp": "Gaussian-process Bayesian optimisation (optuna GPSampler), the default",
    "tpe": "multivariate tree-structured Parzen estimator (optuna TPESampler)",
    "random": "uniform random sampling (optuna RandomSampler), the baseline",
    "evolution": "regularised evolution (one objective) or NSGA-II (several objectives)",
}


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any printable parts (stable across processes and runs)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def default_n_startup(trials: int) -> int:
    """Initial-design size: about a quarter of the budget, between 4 and 10 trials."""
    return max(4, min(10, trials // 4))


def make_sampler(
    name: str,
    seed: int,
    n_objectives: int = 1,
    *,
    n_startup: int | None = None,
    population_size: int | None = None,
) -> BaseSampler:
    """An Optuna sampler by name (``gp``, ``tpe``, ``random``, ``evolution``).

    ``n_startup`` is the number of initial random trials of ``gp``/``tpe`` (Optuna's
    ``n_startup_trials``, default 10); ``population_size`` is the population of
    ``evolution`` (default 10 for regularised evolution, 20 for NSGA-II).
    """
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    if n_objectives < 1:
        raise ValueError("n_objectives must be at least 1")
    startup = 10 if n_startup is None else int(n_startup)
    inner: BaseSampler
    if name == "gp":
        inner = optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    elif name == "tpe":
        inner = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True
        )
    elif name == "random":
        inner = optuna.samplers.RandomSampler(seed=seed)
    elif n_objectives == 1:
        inner = RegularizedEvolutionSampler(seed=seed, population_size=population_size or 10)
    else:
        inner = optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size or 20)
    return TrialSeededSampler(inner, seed=seed, name=name)


def _random_states(obj: Any, depth: int = 0) -> list[LazyRandomState]:
    """Every LazyRandomState reachable from a sampler's attributes (nested samplers too)."""
    found: list[LazyRandomState] = []
    if depth > 3 or not hasattr(obj, "__dict__"):
        return found
    for value in vars(obj).values():
        if isinstance(value, LazyRandomState):
            found.append(value)
        elif isinstance(value, BaseSampler):
            found.extend(_random_states(value, depth + 1))
    return found


class TrialSeededSampler(BaseSampler):
    """Delegates to an Optuna sampler, reseeding its random streams before each trial.

    Optuna's samplers draw from one random stream that advances with every call, so
    a proposal depends on how many calls this process made before. Reseeding from
    ``(seed, trial.number)`` makes it depend on the trial log only. The GP's cache of
    kernel parameters (a warm start for the next fit) is dropped for the same reason.
    """

    def __init__(self, inner: BaseSampler, *, seed: int, name: str):
        self.inner = inner
        self.name = name
        self._seed = int(seed)
        self._states = _random_states(inner)
        if not self._states:
            # Fail loudly if an Optuna upgrade renamed the streams: reseeding would be a no-op.
            raise RuntimeError(f"no random state found in {type(inner).__name__}")

    def __str__(self) -> str:
        return f"{self.name}({type(self.inner).__name__}, seed={self._seed})"

    def _reseed(self, number: int) -> None:
        for i, state in enumerate(self._states):
            state.rng.seed(derive_seed(self._seed, number, i))
        forget_gp_cache(self.inner)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._reseed(trial.number)
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def _violation(trial: FrozenTrial) -> float:
    return float(sum(max(0.0, v) for v in trial.constraints.values()))


class RegularizedEvolutionSampler(BaseSampler):
    """Regularised (aging) evolution for one objective over categorical parameters.

    The population is the ``population_size`` most recent completed trials (by trial
    number): older ones age out whatever their score, which is what regularises the
    search (Real et al. 2019). For each new trial a tournament of ``tournament_size``
    members drawn from the population picks a parent (feasible before infeasible, then
    the best value); the child copies the parent and changes one parameter to another
    choice. Until the population is full, children are drawn uniformly: that is the
    algorithm's initial population, not a fallback.

    No state is kept between calls: the population is read from ``study.trials`` and the
    random draws are seeded from ``(seed, trial.number)``.
    """

    def __init__(
        self, *, seed: int = 0, population_size: int = 10, tournament_size: int | None = None
    ):
        if population_size < 2:
            raise ValueError("population_size must be at least 2")
        self._seed = int(seed)
        self.population_size = population_size
        self.tournament_size = tournament_size or max(2, population_size // 4)
        # A random stream the wrapper may reseed; the draws below derive their own.
        self._rng = LazyRandomState(seed)
        self._space = IntersectionSearchSpace()

    def _generator(self, trial: FrozenTrial, *extra: Any) -> np.random.Generator:
        return np.random.default_rng(derive_seed(self._seed, trial.number, *extra))

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial):
        return {
            name: dist
            for name, dist in self._space.calculate(study).items()
            if isinstance(dist, CategoricalDistribution) and not dist.single()
        }

    def population(self, study: Study, before: int | None = None) -> list[FrozenTrial]:
        """The current population: the newest completed trials, oldest first."""
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if before is not None:
            done = [t for t in done if t.number < before]
        done.sort(key=lambda t: t.number)
        return done[-self.population_size :]

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        if len(study.directions) > 1:
            raise ValueError("RegularizedEvolutionSampler handles one objective; use NSGA-II")
        population = [
            t
            for t in self.population(study, before=trial.number)
            if search_space.keys() <= t.params.keys()
        ]
        if len(population) < self.population_size:
            return {}
        rng = self._generator(trial, "relative")
        picks = rng.choice(
            len(population), size=min(self.tournament_size, len(population)), replace=False
        )
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        # Lower key is better: feasibility first, then the objective, then the older trial.
        parent = min(
            (population[i] for i in picks),
            key=lambda t: (_violation(t), sign * float(t.value), t.number),
        )
        child = {name: parent.params[name] for name in search_space}
        mutable = [n for n in sorted(search_space) if len(search_space[n].choices) > 1]
        name = mutable[int(rng.integers(len(mutable)))]
        others = [c for c in search_space[name].choices if c != child[name]]
        child[name] = others[int(rng.integers(len(others)))]
        return child

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        # The initial population (and any parameter outside the common space) is uniform.
        rng = self._generator(trial, "independent", param_name)
        if isinstance(param_distribution, CategoricalDistribution):
            choices: Sequence[Any] = param_distribution.choices
            return choices[int(rng.integers(len(choices)))]
        return optuna.samplers.RandomSampler(
            seed=derive_seed(self._seed, trial.number, param_name)
        ).sample_independent(study, trial, param_name, param_distribution)
