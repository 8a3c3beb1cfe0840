"""One suite every sampler passes: determinism, validity, failures, constraints, learning.

The samplers are driven by ask/tell on in-memory studies with a synthetic score table,
so nothing is trained. ``CASES`` lists (sampler, number of objectives).
"""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from hcomposer.pattern import parse_pattern
from hcomposer.search import SearchConfig, load_trials, make_sampler, run_search
from hcomposer.search.objectives import synthetic_score
from hcomposer.search.samplers import TrialSeededSampler

optuna.logging.set_verbosity(optuna.logging.WARNING)


class _SmallGP(optuna.samplers.GPSampler):
    """The real GP sampler with a cheaper acquisition search (tests share two cores)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._n_preliminary_samples = 256
        self._n_local_search = 3
        self._n_qmc_samples_ehvi = 32


@pytest.fixture(autouse=True)
def _small_gp(monkeypatch):
    monkeypatch.setattr(optuna.samplers, "GPSampler", _SmallGP)


CHOICES = ["A", "F", "S"]
N_POS = 5
STARTUP = 4
CASES = [("gp", 1), ("tpe", 1), ("random", 1), ("evolution", 1), ("evolution", 2), ("gp", 2)]
MODEL_BASED = [c for c in CASES if c[0] != "random" and c != ("gp", 2)]


def _space():
    return {f"p{i:02d}": CategoricalDistribution(CHOICES) for i in range(N_POS)}


def _pattern(params) -> str:
    return "".join(params[f"p{i:02d}"] for i in range(N_POS))


def drive(name, n_obj, *, seed=0, trials=8, score=synthetic_score, fail=None, spy=None):
    """Ask/tell ``trials`` times; returns (patterns, study)."""
    sampler = make_sampler(name, seed, n_obj, n_startup=STARTUP, population_size=4)
    if spy is not None:
        spy(sampler)
    study = optuna.create_study(sampler=sampler, directions=["maximize"] * n_obj)
    patterns = []
    for _ in range(trials):
        trial = study.ask(_space())
        p = _pattern(trial.params)
        patterns.append(p)
        if fail is not None and fail(p):
            study.tell(trial, state=TrialState.FAIL)
            continue
        s = score(p)
        study.tell(trial, s if n_obj == 1 else [s, -p.count("A")])
    return patterns, study


@pytest.mark.parametrize("name,n_obj", CASES)
def test_same_seed_same_proposals(name, n_obj):
    a, _ = drive(name, n_obj, seed=3, trials=STARTUP + 2)
    b, _ = drive(name, n_obj, seed=3, trials=STARTUP + 2)
    c, _ = drive(name, n_obj, seed=4, trials=STARTUP)
    assert a == b
    assert a[:STARTUP] != c


@pytest.mark.parametrize("name,n_obj", CASES)
def test_proposals_are_valid_patterns(name, n_obj):
    patterns, study = drive(name, n_obj)
    for p, t in zip(patterns, study.trials):
        assert set(t.params) == set(_space())
        assert all(v in CHOICES for v in t.params.values())
        assert len(parse_pattern(p)) == N_POS


@pytest.mark.parametrize("name,n_obj", CASES)
def test_failed_trials_are_handled(name, n_obj):
    # Every pattern with two or more S fails: about half of the space.
    patterns, study = drive(name, n_obj, fail=lambda p: p.count("S") >= 2)
    states = [t.state for t in study.trials]
    assert TrialState.FAIL in states and TrialState.COMPLETE in states
    assert len(patterns) == 8


@pytest.mark.parametrize("name,n_obj", MODEL_BASED)
def test_model_based_proposals_depend_on_history(name, n_obj):
    # Same seed, opposite scores: the initial design is equal, what follows is not.
    up, _ = drive(name, n_obj)
    down, _ = drive(name, n_obj, score=lambda p: -synthetic_score(p))
    assert up[:STARTUP] == down[:STARTUP]
    assert up[STARTUP:] != down[STARTUP:]


@pytest.mark.parametrize("name,n_obj", [("gp", 1), ("tpe", 1), ("evolution", 1), ("gp", 2)])
def test_no_silent_fallback_to_independent_sampling(name, n_obj):
    """After the initial design every slot comes from the model (sample_relative)."""
    calls: list[int] = []

    def spy(sampler: TrialSeededSampler):
        inner = sampler.sample_independent

        def counted(study, trial, param_name, dist):
            calls.append(trial.number)
            return inner(study, trial, param_name, dist)

        sampler.sample_independent = counted

    drive(name, n_obj, spy=spy)
    # evolution's initial population is its 4 members; gp/tpe's startup is STARTUP trials.
    assert calls, "the initial design should be sampled independently"
    assert max(calls) < STARTUP, f"independent sampling after the initial design: {calls}"


def _counting(calls: list[str]):
    def objective(arch, proxy, seed):
        calls.append(arch.pattern)
        return {"score": synthetic_score(arch.pattern, seed)}

    return objective


@pytest.mark.parametrize("name,n_obj", CASES)
def test_constraints_are_respected(name, n_obj, tmp_path):
    calls: list[str] = []
    objective = ("score",) if n_obj == 1 else ("score", "kv")
    config = SearchConfig(
        primitives="AFW",
        layers=3,
        trials=5,
        sampler=name,
        objective=objective,
        shape="tiny",
        proxy="synthetic",
        max_count={"A": 1},
        min_count={"F": 1},
        n_startup=3,
        population_size=3,
    )
    result = run_search(config, tmp_path / "s", objective=_counting(calls), progress=False)
    trials = load_trials(tmp_path / "s")
    done = [t for t in trials if t["state"] == "COMPLETE"]
    infeasible = [t for t in trials if t["state"] == "INFEASIBLE"]
    assert len(done) == 5
    assert sorted(calls) == sorted(t["pattern"] for t in done)  # only feasible ones trained
    for t in done:
        assert t["pattern"].count("A") <= 1 and t["pattern"].count("F") >= 1
    for t in infeasible:
        assert t["pattern"].count("A") > 1 or t["pattern"].count("F") < 1
        assert t["failure"].startswith("infeasible:")
    best = result.best if isinstance(result.best, list) else [result.best]
    assert all(b["state"] == "COMPLETE" for b in best)
