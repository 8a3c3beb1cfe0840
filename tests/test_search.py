"""The search engine: run folder, answers from the log, strategies, objectives, bad input.

All searches use a synthetic score table (``hcomposer.search.objectives``): nothing trains.
"""

from __future__ import annotations

import json
import math

import pytest

from hcomposer.cli import main
from hcomposer.errors import UserError
from hcomposer.search import SearchConfig, load_trials, run_search
from hcomposer.search.objectives import synthetic_score
from hcomposer.search.space import plan_stages
from hcomposer.training import TrainConfig


def counting(calls: list[str], fail_on: str | None = None):
    def objective(arch, proxy, seed):
        calls.append(arch.pattern)
        if fail_on is not None and arch.pattern.startswith(fail_on):
            raise RuntimeError("boom")
        return {"score": synthetic_score(arch.pattern, seed)}

    return objective


def small(**kw) -> SearchConfig:
    base = dict(
        primitives="AF",
        layers=3,
        trials=6,
        sampler="random",
        shape="tiny",
        proxy="synthetic",
        seed=0,
    )
    base.update(kw)
    return SearchConfig(**base)


def test_run_folder_and_records(tmp_path):
    calls: list[str] = []
    out = tmp_path / "run"
    result = run_search(small(), out, objective=counting(calls), progress=False)
    for name in ("search.json", "run.json", "study.db", "trials.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    trials = load_trials(out)
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(done) == 6
    # A pattern is trained once; repeats are answered from the log.
    assert len(calls) == 6 and len(set(calls)) == 6
    assert sorted(calls) == sorted(t["pattern"] for t in done)
    for t in done:
        assert t["score"] == pytest.approx(synthetic_score(t["pattern"], 0))
        assert t["seed"] == 0 and t["proxy"] == "synthetic"
        assert t["cost"]["params_total"] > 0 and t["wall_seconds"] >= 0
        assert t["architecture"]["pattern"] == t["pattern"]
    for t in trials:
        if t["state"] == "CACHED":
            src = next(d for d in done if d["number"] == t["cached_from"])
            assert src["pattern"] == t["pattern"] and src["score"] == t["score"]
    best = max(done, key=lambda t: t["score"])
    assert result.best["pattern"] == best["pattern"]
    lines = (out / "trials.jsonl").read_text().splitlines()
    assert [json.loads(x)["number"] for x in lines] == [t["number"] for t in trials]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["pattern"] == best["pattern"]
    # The same command again resumes a finished search: nothing is trained, nothing lost.
    run_search(small(workers=1), out, objective=counting(calls), progress=False)
    assert len(calls) == 6
    assert load_trials(out) == trials


def test_interrupted_trial_is_run_again(tmp_path):
    out = tmp_path / "run"
    calls: list[str] = []

    def interrupt_third(arch, proxy, seed):
        calls.append(arch.pattern)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return {"score": synthetic_score(arch.pattern, seed)}

    with pytest.raises(KeyboardInterrupt):
        run_search(small(), out, objective=interrupt_third, progress=False)
    run_search(small(), out, objective=counting(calls), progress=False)
    trials = load_trials(out)
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(done) == 6 and len({t["pattern"] for t in done}) == 6
    killed = next(t for t in trials if t["state"] == "FAIL")
    retry = next(t for t in trials if t["retry_of"] == killed["number"])
    assert retry["pattern"] == killed["pattern"] == calls[2] and retry["state"] == "COMPLETE"
    assert calls[3] == calls[2]  # the rerun starts with the interrupted pattern


def test_failures_are_recorded_and_not_retrained(tmp_path):
    calls: list[str] = []
    out = tmp_path / "run"
    run_search(small(trials=4), out, objective=counting(calls, fail_on="AA"), progress=False)
    trials = load_trials(out)
    failed = [t for t in trials if t["state"] == "FAIL"]
    assert failed and all(
        t["failure"].startswith(("RuntimeError: boom", "failed before")) for t in failed
    )
    assert len([t for t in trials if t["state"] == "COMPLETE"]) == 4
    trained_fail = [c for c in calls if c.startswith("AA")]
    assert len(trained_fail) == len(set(trained_fail))  # a failing pattern is tried once


def test_non_finite_score_fails_the_trial(tmp_path):
    def nan_for_f_first(arch, proxy, seed):
        return math.nan if arch.pattern[0] == "F" else synthetic_score(arch.pattern)

    run_search(small(trials=3), tmp_path / "r", objective=nan_for_f_first, progress=False)
    trials = load_trials(tmp_path / "r")
    bad = [t for t in trials if t["pattern"][0] == "F"]
    assert bad and all(t["state"] == "FAIL" and "nan" in t["failure"] for t in bad)
    assert len([t for t in trials if t["state"] == "COMPLETE"]) == 3


@pytest.mark.parametrize("strategy", ["end-incremental", "middle-incremental"])
def test_incremental_strategies_keep_the_fixed_part(strategy, tmp_path):
    config = small(primitives="AFW", layers=6, stage_size=2, trials=9, strategy=strategy)
    assert [s.length for s in plan_stages(config)] == [2, 4, 6]
    result = run_search(config, tmp_path / "r", objective=counting([]), progress=False)
    stages = [load_trials(tmp_path / "r", stage=i) for i in range(3)]
    prev_best = None
    for i, trials in enumerate(stages):
        done = [t for t in trials if t["state"] == "COMPLETE"]
        assert len(done) == 3
        assert all(len(t["pattern"]) == 2 * (i + 1) for t in trials)
        if prev_best is not None:
            cut = (len(prev_best) + 1) // 2
            for t in trials:
                if strategy == "end-incremental":
                    assert t["pattern"].startswith(prev_best)
                else:
                    assert t["pattern"][:cut] == prev_best[:cut]
                    assert t["pattern"][cut + 2 :] == prev_best[cut:]
        prev_best = max(done, key=lambda t: (t["score"], -t["number"]))["pattern"]
    assert result.best["pattern"] == prev_best
    assert load_trials(tmp_path / "r") == stages[-1]  # the default is the final stage


def test_two_objectives_report_the_pareto_front(tmp_path):
    config = small(primitives="AFW", layers=3, trials=10, objective="score,kv")
    result = run_search(config, tmp_path / "r", objective=counting([]), progress=False)
    done = [t for t in load_trials(tmp_path / "r") if t["state"] == "COMPLETE"]
    front = result.best
    assert isinstance(front, list) and front

    def dominated(t):
        return any(
            o["score"] >= t["score"]
            and o["values"]["kv"] <= t["values"]["kv"]
            and (o["score"] > t["score"] or o["values"]["kv"] < t["values"]["kv"])
            for o in done
        )

    assert all(not dominated(t) for t in front)
    assert {t["pattern"] for t in done if not dominated(t)} == {t["pattern"] for t in front}
    # KV bytes come from accounting: W (window) and F cost less cache than A.
    assert all(t["values"]["kv"] == t["cost"]["kv_bytes_per_token"] for t in done)


def test_config_round_trip_and_recipes():
    from hcomposer.recipes import RECIPES, Recipe

    for make in RECIPES.values():
        recipe = make()
        config = recipe.search
        assert SearchConfig.from_dict(json.loads(config.to_json())) == config
        assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert RECIPES["quickstart"]().search.primitives == ("A", "F", "S")
    # A pipeline.json written before the recipes were typed (only the changed train fields,
    # no eval options) reads back as the same recipe, so such a run still resumes.
    before = dict(RECIPES["quickstart"]().to_dict(), eval_options={})
    defaults = TrainConfig().to_dict()
    before["train"] = {
        k: v for k, v in RECIPES["quickstart"]().train.to_dict().items() if v != defaults[k]
    }
    assert 3 <= len(before["train"]) < len(defaults)
    assert Recipe.from_dict(before) == RECIPES["quickstart"]()
    # One written before the seed-noise fields: one training seed, no re-scoring, as it ran.
    for key in ("train_seeds", "rescore_top", "rescore_seeds"):
        before.pop(key)
    old = Recipe.from_dict(before)
    assert (old.train_seeds, old.rescore_top) == (1, 0)
    assert old == RECIPES["quickstart"]().replace(train_seeds=1, rescore_top=0)
    with pytest.raises(UserError, match="train_seeds"):
        RECIPES["quickstart"]().replace(train_seeds=0)
    paper = RECIPES["paper"]().search
    assert (paper.layers, paper.primitives, paper.sampler) == (16, ("A", "F"), "gp")
    groups = SearchConfig(primitives="A,F,[A|S]")
    assert groups.primitives == ("A", "F", "[A|S]")


def test_cli_json(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "search",
            "--proxy",
            "synthetic",
            "--primitives",
            "AF",
            "--layers",
            "3",
            "--trials",
            "4",
            "--sampler",
            "tpe",
            "--shape",
            "tiny",
            "--out",
            str(out),
            "--json",
            "--no-progress",
        ]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert {"trials", "best"} <= set(data)
    for t in data["trials"]:
        assert {"number", "pattern", "score", "state"} <= set(t)
    assert sum(t["state"] == "COMPLETE" for t in data["trials"]) == 4
    assert data["best"]["score"] == max(
        t["score"] for t in data["trials"] if t["score"] is not None
    )


def _snapshot(path):
    return (
        {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
        if path.exists()
        else None
    )


@pytest.mark.parametrize(
    "extra",
    [
        ["--primitives", "AFX"],
        ["--layers", "0"],
        ["--trials", "0"],
        ["--storage", "sqlite:////no/such/folder/study.db"],
        ["--storage", "postgresql://nobody:x@127.0.0.1:9/none"],
        ["--sampler", "bayes"],
        ["--objective", "kv"],
    ],
)
def test_bad_input_exits_2_and_writes_nothing(extra, tmp_path, capsys):
    out = tmp_path / "bad"
    code = main(["search", "--proxy", "synthetic", "--trials", "3", "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert not out.exists()


def test_folder_with_another_config_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    args = [
        "search",
        "--proxy",
        "synthetic",
        "--primitives",
        "AF",
        "--layers",
        "3",
        "--trials",
        "3",
        "--sampler",
        "random",
        "--shape",
        "tiny",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main([*args, "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another configuration" in err and "--out" in err
    assert _snapshot(out) == before


def test_config_validation():
    with pytest.raises(UserError, match="unknown primitive"):
        SearchConfig(primitives="AQ")
    with pytest.raises(UserError, match="at least two"):
        SearchConfig(primitives="AA")
    with pytest.raises(UserError, match="distinct patterns"):
        plan_stages(SearchConfig(primitives="AF", layers=3, trials=9))
    with pytest.raises(UserError, match="min-count"):
        SearchConfig(min_count={"A": 9}, layers=6)


def test_proxy_config_reaches_the_evaluator(monkeypatch):
    """A search's proxy_config is handed to evaluate_proxy as a ProxyConfig."""
    from hcomposer.search import objectives
    from hcomposer.search.objectives import resolve_objective
    from hcomposer.search.space import SearchConfig

    seen = {}

    def fake(arch, proxy, *, seed=0, config=None, **kw):
        seen["config"] = config
        return {"score": 0.5}

    monkeypatch.setattr(objectives, "evaluate_proxy", fake)
    cfg = SearchConfig(layers=2, trials=1, proxy="mad:recall", proxy_config={"steps": 7})
    objective = resolve_objective(cfg.proxy, None, cfg.proxy_config)
    from hcomposer.architecture import Architecture

    objective(Architecture.parse("AF", "tiny"), proxy=cfg.proxy, seed=0)
    assert seen["config"].steps == 7
    with pytest.raises(UserError):
        SearchConfig(layers=2, trials=1, proxy_config={"no_such_field": 1})
