"""Pruning weak trials (``--pruner``): a scripted proxy, Optuna's MedianPruner, the trial log.

The fake proxy reports scripted per-task values through the ``report`` hook exactly as
``evaluate_proxy`` does (after task k: the mean of the first k tasks). The test recomputes
the median rule by hand from the trial log and compares every decision with the search's.
"""

from __future__ import annotations

import hashlib
import json
import statistics

import optuna
import pytest
from optuna.trial import TrialState

from hcomposer.cli import main
from hcomposer.errors import UserError
from hcomposer.proxies.proxy import ProxyPruned
from hcomposer.scaling.aggregate import aggregate, completed_candidates
from hcomposer.search import SearchConfig, load_trials, run_search
from hcomposer.search.claims import decide
from hcomposer.search.executors import Executor

N_TASKS = 3


def task_values(pattern: str) -> list[float]:
    """Scripted per-task accuracies of a pattern (a fixed hash, nothing trained)."""
    out = []
    for k in range(N_TASKS):
        h = hashlib.sha256(f"{pattern}:{k}".encode()).digest()
        out.append(int.from_bytes(h[:4], "little") / 2**32)
    return out


def scripted(calls: list[tuple[str, int]]):
    def objective(arch, proxy, seed, report=None):
        vals = task_values(arch.pattern)
        for k in range(1, N_TASKS + 1):
            calls.append((arch.pattern, k))
            value = sum(vals[:k]) / k
            # As evaluate_proxy: the answer after the last task is not heeded.
            if report is not None and report(k, value) and k < N_TASKS:
                raise ProxyPruned(k, value)
        return {"score": sum(vals) / N_TASKS}

    return objective


def config(**kw) -> SearchConfig:
    base = dict(
        primitives="AF",
        layers=4,
        trials=12,
        sampler="random",
        shape="tiny",
        proxy="synthetic",
        seed=0,
        pruner="median",
    )
    base.update(kw)
    return SearchConfig(**base)


def median_rule(trials: list[dict], number: int, pattern: str) -> int | None:
    """Optuna's MedianPruner (5 startup trials, no warm-up) by hand: the step at which the
    trial ``number`` is pruned, or None. Reads the completed trials numbered before it."""
    before = [t for t in trials if t["number"] < number and t["state"] in ("COMPLETE", "CACHED")]
    vals = task_values(pattern)
    best = -float("inf")
    for k in range(1, N_TASKS):  # never after the last task
        best = max(best, sum(vals[:k]) / k)
        if len(before) < 5:
            continue
        # Only trained trials reported intermediate values (cached copies did not).
        at_k = [
            sum(task_values(t["pattern"])[:k]) / k
            for t in before
            if t["state"] == "COMPLETE" and t["cached_from"] is None
        ]
        if at_k and best < statistics.median(at_k):
            return k
    return None


def test_median_pruner_stores_pruned_trials_and_never_scores_them(tmp_path):
    calls: list[tuple[str, int]] = []
    out = tmp_path / "run"
    result = run_search(config(), out, objective=scripted(calls), progress=False)
    trials = load_trials(out)
    trained = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED") and not t["cached_from"]]
    pruned = [t for t in trained if t["state"] == "PRUNED"]
    assert pruned, "the scripted values are spread enough that some trial must be pruned"
    # The budget counts pruned trials: 12 trained in all, scored or pruned.
    assert len(trained) == 12
    for t in trained:
        step = median_rule(trials, t["number"], t["pattern"])
        ran = max(k for p, k in calls if p == t["pattern"])
        if t["state"] == "PRUNED":
            assert step is not None and t["pruned_step"] == step == ran
            vals = task_values(t["pattern"])
            assert t["pruned_value"] == pytest.approx(sum(vals[:step]) / step)
            # Never a score: no score, no values.
            assert t["score"] is None and t["values"] is None
        else:
            assert step is None and ran == N_TASKS
            assert t["score"] == pytest.approx(sum(task_values(t["pattern"])) / N_TASKS)
    # Each pattern trained once (a repeat of a pruned pattern is told PRUNED, not re-run).
    assert len(calls) == sum(t["pruned_step"] or N_TASKS for t in trained)
    for t in trials:
        if t["state"] == "PRUNED" and t["cached_from"] is not None:
            src = next(s for s in trials if s["number"] == t["cached_from"])
            assert src["state"] == "PRUNED" and src["pattern"] == t["pattern"]
    # The aggregator and the best ignore pruned trials.
    cands, n_used = completed_candidates(trials)
    scored = {t["pattern"] for t in trained if t["state"] == "COMPLETE"}
    assert {c.pattern for c in cands} == scored and n_used == len(scored)
    assert result.best["pattern"] in scored
    # Resume: pruned trials count as done; nothing runs again.
    n_calls = len(calls)
    run_search(config(), out, objective=scripted(calls), progress=False)
    assert len(calls) == n_calls and load_trials(out) == trials


def test_aggregator_ignores_a_pruned_record_even_with_a_score():
    trials = [
        {"pattern": "AF", "score": 0.5, "state": "COMPLETE"},
        {"pattern": "AA", "score": 0.9, "state": "PRUNED"},
        {"pattern": "FF", "score": 0.1, "state": "COMPLETE"},
    ]
    assert aggregate(trials, "best") == "AF"
    assert {c.pattern for c in completed_candidates(trials)[0]} == {"AF", "FF"}


def test_no_pruner_runs_every_task(tmp_path):
    calls: list[tuple[str, int]] = []
    run_search(config(pruner="none"), tmp_path / "run", objective=scripted(calls), progress=False)
    trials = load_trials(tmp_path / "run")
    assert not any(t["state"] == "PRUNED" for t in trials)
    assert len(calls) == N_TASKS * sum(
        t["state"] == "COMPLETE" for t in trials if not t["cached_from"]
    )


def test_pruner_options():
    with pytest.raises(UserError, match="unknown pruner"):
        config(pruner="sometimes")
    with pytest.raises(UserError, match="single-objective"):
        config(objective="score,kv")
    # An old search.json (no pruner field) loads as "none" and keeps its identity.
    old = config(pruner="none").to_dict()
    old.pop("pruner")
    assert SearchConfig.from_dict(old).identity() == config(pruner="none").identity()
    assert "pruner" in config().identity()


def test_cli_pruner_flag(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["search", "--proxy", "synthetic", "--primitives", "AF", "--layers", "3"]
    argv += ["--trials", "4", "--sampler", "random", "--pruner", "hyperband", "--out", str(out)]
    assert main([*argv, "--json", "--no-progress"]) == 0
    capsys.readouterr()
    stored = json.loads((out / "search.json").read_text())["config"]
    assert SearchConfig.from_dict(stored).pruner == "hyperband"
    assert main(["search", "--pruner", "bogus", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def _log(*specs) -> list:
    """A trial log of (state, role, pattern) entries, numbered from 0."""
    study = optuna.create_study()
    for state, role, pattern in specs:
        attrs = {"role": role, "pattern": pattern}
        value = 0.5 if state == TrialState.COMPLETE else None
        study.add_trial(optuna.trial.create_trial(state=state, value=value, user_attrs=attrs))
    return study.get_trials(deepcopy=False)


def test_claims_count_a_pruned_trial_as_trained_and_known():
    P, C = TrialState.PRUNED, TrialState.COMPLETE
    log = _log((P, "evaluation", "AF"), (C, "evaluation", "FA"), (P, "pruned-before", "AF"))
    # The pruned pattern is known: told PRUNED again, never trained twice.
    verdict, known = decide(log, 3, "AF", budget=10, is_retry=False)
    assert verdict == "pruned" and known.number == 0
    # It spent a slot of the budget like a scored trial (the pruned-before copy did not).
    assert decide(log, 3, "AA", budget=2, is_retry=False) == ("surplus", None)
    assert decide(log, 3, "AA", budget=3, is_retry=False) == ("train", None)


def test_pruner_is_part_of_the_search_identity(tmp_path):
    out = tmp_path / "run"
    run_search(config(trials=3), out, objective=scripted([]), progress=False)
    with pytest.raises(UserError, match="another configuration"):
        run_search(config(trials=3, pruner="hyperband"), out, objective=scripted([]))
    with pytest.raises(UserError, match="another configuration"):
        run_search(config(trials=3, pruner="none"), out, objective=scripted([]))


def test_an_executor_without_the_report_hook_refuses_a_pruner(tmp_path):
    class Remote(Executor):
        name = "remote"
        reports = False

    with pytest.raises(UserError, match="needs --executor local"):
        run_search(config(), tmp_path / "run", objective=scripted([]), executor=Remote())
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_pruner_on_ray_before_writing(tmp_path, capsys):
    pytest.importorskip("ray")
    out = tmp_path / "s"
    argv = ["search", "--proxy", "synthetic", "--primitives", "AF", "--layers", "3"]
    argv += ["--pruner", "median", "--executor", "ray", "--out", str(out)]
    assert main(argv) == 2
    assert "needs --executor local" in capsys.readouterr().err
    assert not out.exists()
