"""Tabular search benchmark: tables, replay bookkeeping, summaries, the command (synthetic)."""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import pytest

from hcomposer.cli import main
from hcomposer.errors import UserError
from hcomposer.search.tabular import Table, load_table, replay, synthetic_table
from hcomposer.search.tabular_report import summarise


def test_synthetic_table_is_full_deterministic_and_round_trips(tmp_path):
    a, b = synthetic_table("AF", 4, seed=1), synthetic_table("AF", 4, seed=1)
    assert a.scores == b.scores and len(a.scores) == 16
    assert synthetic_table("AF", 4, seed=2).scores != a.scores
    path = tmp_path / "t.json"
    path.write_text(json.dumps(a.to_dict()))
    c = load_table(str(path))
    assert c.scores == a.scores and c.choices == ("A", "F") and c.positions == 4
    assert load_table("synthetic:AFS:3:5").scores == synthetic_table("AFS", 3, 5).scores


def test_top_k_includes_ties():
    scores = {"AA": 1.0, "AF": 0.5, "FA": 0.5, "FF": 0.1}
    t = Table("t", ("A", "F"), 2, scores)
    assert t.top(1) == {"AA"}
    assert t.top(2) == {"AA", "AF", "FA"}
    assert t.top(3) == {"AA", "AF", "FA"}
    assert t.ranked[0] == ("AA", 1.0) and t.best_score == 1.0


def test_table_validation():
    with pytest.raises(UserError, match="full space"):
        Table("t", ("A", "F"), 2, {"AA": 1.0})
    with pytest.raises(UserError, match="outside"):
        Table("t", ("A", "F"), 1, {"A": 1.0, "S": 0.0})
    with pytest.raises(UserError, match="unknown table"):
        load_table("nope")
    with pytest.raises(UserError, match="does not exist"):
        load_table("missing/table.json")


def _check_replay(table, r, budget):
    """Recompute every reported number from the proposals alone."""
    top1, top3 = table.top(1), table.top(3)
    assert len(r.regret) == budget
    firsts = list(dict.fromkeys(r.proposals))  # distinct patterns in order of evaluation
    assert 1 <= len(firsts) <= budget
    best = float("-inf")
    for e, p in enumerate(firsts, 1):
        best = max(best, table.scores[p])
        assert r.regret[e - 1] == pytest.approx(table.best_score - best)
    assert all(x >= y for x, y in zip(r.regret, r.regret[1:]))  # best-so-far never worsens
    first3 = next((e for e, p in enumerate(firsts, 1) if p in top3), None)
    first1 = next((e for e, p in enumerate(firsts, 1) if p in top1), None)
    assert r.evals_to_top3 == first3 and r.evals_to_top1 == first1
    if first1 is not None:
        assert len(firsts) == first1 and r.regret[-1] == 0.0  # stopped at the top-1
        assert r.proposals[-1] in top1 and r.asks_to_top1 == len(r.proposals)
        assert first3 <= first1
    else:
        assert r.regret[-1] > 0
    if first3 is not None:
        assert r.proposals[r.asks_to_top3 - 1] in top3
        assert not top3 & set(r.proposals[: r.asks_to_top3 - 1])


@pytest.mark.parametrize("sampler", ["random", "tpe", "evolution", "gp"])
def test_replay_bookkeeping_and_determinism(sampler):
    table = synthetic_table("AF", 4, seed=3)
    budget = 10 if sampler == "gp" else 24
    r = replay(table, sampler, seed=7, budget=budget, n_startup=4)
    _check_replay(table, r, budget)
    # Same seed, same proposals (samplers are seeded from (seed, trial number)).
    assert replay(table, sampler, seed=7, budget=budget, n_startup=4).proposals == r.proposals


def test_random_needs_about_space_over_hits_trials():
    # 5-position A/F space (32 patterns), top-3 = 3 patterns: random sampling with replacement
    # hits one after a geometric number of trials with mean 32/3, median about 7.
    table = synthetic_table("AF", 5, seed=0)
    assert len(table.top(3)) == 3
    reps = [replay(table, "random", s, 32) for s in range(40)]
    asks = [r.asks_to_top3 for r in reps]
    assert None not in asks
    assert 4 <= statistics.median(asks) <= 12
    # Counting distinct evaluations instead (sampling without replacement), the first of 3
    # top patterns among 32 comes at (32 + 1) / (3 + 1) = 8.25 on average.
    assert 5 <= statistics.fmean(r.evals_to_top3 for r in reps) <= 11.5


def test_summary_counts_misses_as_budget_plus_one():
    table = Table("t", ("A", "F"), 1, {"A": 1.0, "F": 0.0})
    reps = {"random": [replay(table, "random", s, 1) for s in range(9)]}
    s = summarise(reps, budget=1)["random"]
    hits = [r.evals_to_top1 for r in reps["random"]]
    misses = hits.count(None)
    assert s["misses_top1"] == misses and 0 < misses < 9
    expected = statistics.median([2 if h is None else h for h in hits])
    assert s["median_evals_to_top1"] == expected
    assert s["mean_regret"]["1"] == pytest.approx(misses / 9)


def test_command_writes_report_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = [
        "bench-search",
        "--table",
        "synthetic:AF:4:1",
        "--seeds",
        "3",
        "--samplers",
        "random,tpe,evolution",
        "--budget",
        "16",
        "--out",
        str(out),
        "--json",
    ]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["samplers"]) == {"random", "tpe", "evolution"}
    assert doc["budget"] == 16 and doc["seeds"] == [0, 1, 2]
    full = json.loads((out / "results.json").read_text())
    table = load_table("synthetic:AF:4:1")
    for name, reps in full["replays"].items():
        hits = [r["evals_to_top3"] for r in reps]
        expected = statistics.median(17 if h is None else h for h in hits)
        assert doc["samplers"][name]["median_evals_to_top3"] == expected
        assert all(r["proposals"][0] in table.scores for r in reps)
    assert (out / "regret.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "| random |" in report and "bench-search" in report


def test_command_resumes_from_its_replay_log(tmp_path, capsys):
    """A killed bench-search keeps its finished replays: a rerun reads them back (not run
    again), runs the rest, and gives what one uninterrupted run gives."""
    base = ["bench-search", "--table", "synthetic:AF:4:1", "--samplers", "random,tpe"]
    base += ["--budget", "8", "--json"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main([*base, "--seeds", "4", "--out", str(whole)]) == 0
    assert main([*base, "--seeds", "2", "--out", str(part)]) == 0
    capsys.readouterr()
    log = part / "replays.jsonl"
    lines = log.read_text().splitlines()
    assert len(lines) == 4
    # Mark one logged replay: if the rerun ran it again, the mark would be gone.
    first = json.loads(lines[0])
    marked = (first["replay"]["sampler"], first["replay"]["seed"])
    first["replay"]["regret"] = [0.125] * 8
    log.write_text("\n".join([json.dumps(first), *lines[1:]]) + '\n{"torn": ')
    assert main([*base, "--seeds", "4", "--out", str(part)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["resumed_replays"] == 4
    got = json.loads((part / "results.json").read_text())["replays"]
    want = json.loads((whole / "results.json").read_text())["replays"]
    for name in want:
        for g, w in zip(got[name], want[name], strict=True):
            if (g["sampler"], g["seed"]) == marked:
                assert g["regret"] == [0.125] * 8
                g["regret"] = w["regret"]
            assert g == w
    # 4 first replays + the torn line + 4 new ones: nothing ran twice.
    assert len(log.read_text().splitlines()) == 9


def test_command_refuses_a_log_of_other_settings(tmp_path, capsys):
    out = tmp_path / "b"
    argv = ["bench-search", "--table", "synthetic:AF:3:0", "--seeds", "2", "--out", str(out)]
    assert main([*argv, "--budget", "4"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*argv, "--budget", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "budget" in err[0] and "--out" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    "extra",
    [
        ["--seeds", "0"],
        ["--budget", "0"],
        ["--samplers", "gp,annealing"],
        ["--table", "nope"],
        ["--n-startup", "0"],
        ["--workers", "0"],
    ],
)
def test_command_bad_input(extra, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["bench-search", "--table", "synthetic:AF:3:0", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert not out.exists()


def test_describe_table_known_answers():
    from hcomposer.search.tabular import describe_table

    scores = {"AA": 4.0, "AF": 3.0, "FA": 1.0, "FF": 0.0}
    per_seed = {
        "AA": {"0": 4.0, "1": 4.5},
        "AF": {"0": 3.0, "1": 2.0},
        "FA": {"0": 1.0, "1": 2.5},
        "FF": {"0": 0.0, "1": 1.0},
    }
    d = describe_table(Table("t", ("A", "F"), 2, scores, {"per_seed": per_seed}))
    assert d["mean"] == 2.0 and d["best"][0] == ("AA", 4.0) and d["worst"][-1] == ("FF", 0.0)
    assert d["mean_by_count"]["A"] == {0: 0.0, 1: 2.0, 2: 4.0}
    # A at position 1: mean(AA, AF) - 2 = 1.5; A at position 2: mean(AA, FA) - 2 = 0.5.
    assert d["position_effect"]["A"] == [1.5, 0.5]
    assert d["position_effect"]["F"] == [-1.5, -0.5]
    # Seed 1 ranks AA > FA > AF > FF against seed 0's AA > AF > FA > FF: rho = 1 - 6*2/60.
    assert d["seed_spearman"]["0-1"] == pytest.approx(0.8)


def test_workers_give_the_same_replays():
    from hcomposer.search.tabular import bench

    table = synthetic_table("AF", 4, seed=2)
    one = bench(table, ["random", "evolution"], [0, 1, 2], 10)
    two = bench(table, ["random", "evolution"], [0, 1, 2], 10, workers=2)
    assert {k: [r.to_dict() for r in v] for k, v in one.items()} == {
        k: [r.to_dict() for r in v] for k, v in two.items()
    }


def _noisy_table():
    per_seed = {"A": {"0": 0.0, "1": 2.0}, "F": {"0": 0.5, "1": 0.5}}
    scores = {p: statistics.fmean(v.values()) for p, v in per_seed.items()}
    return Table("noisy", ("A", "F"), 1, scores, {"per_seed": per_seed})


def test_noisy_replay_draws_seed_scores_and_regrets_the_recommendation():
    table = _noisy_table()
    assert table.seeds == ["0", "1"] and table.seed_scores("A") == [0.0, 2.0]
    seen_low = seen_high = False
    for seed in range(30):
        r = replay(table, "random", seed, budget=2)
        assert r.noisy and len(dict.fromkeys(r.proposals)) == 2  # runs the whole budget
        firsts = list(dict.fromkeys(r.proposals))
        obs = dict(zip(firsts, r.observed))
        assert obs["A"] in (0.0, 2.0) and obs["F"] == 0.5
        # After both: the search picks the best observed; regret is 1.0 minus its mean.
        picked = max(obs, key=obs.get)
        assert r.regret[-1] == pytest.approx(1.0 - table.scores[picked])
        seen_low |= obs["A"] == 0.0
        seen_high |= obs["A"] == 2.0
    assert seen_low and seen_high  # both seeds get drawn
    # The same replay seed draws the same noise.
    assert replay(table, "random", 3, 2).observed == replay(table, "random", 3, 2).observed


def test_tied_set_and_summary_intervals():
    # Three seeds each; B is 0.05 below A with pooled seed std 0.1: tied. C is far below.
    per_seed = {
        "AA": {"0": 1.0, "1": 1.1, "2": 0.9},
        "AF": {"0": 0.95, "1": 1.05, "2": 0.85},
        "FA": {"0": 0.5, "1": 0.6, "2": 0.4},
        "FF": {"0": 0.2, "1": 0.3, "2": 0.1},
    }
    scores = {p: statistics.fmean(v.values()) for p, v in per_seed.items()}
    table = Table("t", ("A", "F"), 2, scores, {"per_seed": per_seed})
    assert table.tied() == {"AA", "AF"}
    reps = {"random": [replay(table, "random", s, 4) for s in range(12)]}
    s = summarise(reps, budget=4)["random"]
    hits = [r.evals_to_tied for r in reps["random"]]
    assert None not in hits and s["median_evals_to_tied"] == statistics.median(hits)
    lo, hi = s["evals_to_tied_ci"]
    assert lo <= s["median_evals_to_tied"] <= hi
    mean4 = statistics.fmean(r.regret[3] for r in reps["random"])
    assert s["mean_regret"]["4"] == pytest.approx(mean4)
    assert s["regret_ci"]["4"][0] <= mean4 <= s["regret_ci"]["4"][1]
    # A second sampler: its regret minus random's, per checkpoint, with an interval.
    reps["tpe"] = [replay(table, "tpe", s, 4) for s in range(12)]
    both = summarise(reps, budget=4)
    assert "regret_minus_random" not in both["random"]
    diff, lo, hi = both["tpe"]["regret_minus_random"]["4"]
    want = both["tpe"]["mean_regret"]["4"] - both["random"]["mean_regret"]["4"]
    assert diff == pytest.approx(want) and lo <= diff <= hi
    # And the median evaluations to the tied set minus random's (a miss counts budget + 1).
    diff, lo, hi = both["tpe"]["evals_to_tied_minus_random"]
    want = both["tpe"]["median_evals_to_tied"] - both["random"]["median_evals_to_tied"]
    assert diff == want and lo <= diff <= hi


@pytest.mark.parametrize("name", ["af6", "af6q", "afs4q"])
def test_committed_tables_are_whole_and_their_means_are_their_seeds(name):
    """A committed table covers its whole space, and each score is its seeds' mean."""
    t = load_table(name)
    assert len(t.scores) == len(t.choices) ** t.positions
    per_seed = t.meta["per_seed"]
    seeds = [str(s) for s in t.meta["seeds"]]
    # af6 is the old one-seed table, kept for the record; the others are seeded.
    assert len(seeds) == 1 if name == "af6" else len(seeds) >= 2
    assert set(per_seed) == set(t.scores)
    for p, s in t.scores.items():
        assert set(per_seed[p]) == set(seeds)
        assert s == pytest.approx(statistics.fmean(per_seed[p][k] for k in seeds), abs=1e-12)
    assert set(t.meta["params_total"]) == set(t.scores)
    assert t.meta["config"]["proxy_config"]["steps"] > 0 and t.meta["git_revision"]


def test_bench_search_defaults_to_a_seeded_table():
    from hcomposer.commands import bench_search_cmd

    p = argparse.ArgumentParser()
    bench_search_cmd.add_arguments(p)
    default = p.parse_args([]).table
    assert len(load_table(default).meta.get("seeds", [])) >= 2


def test_random_expected_evals_matches_enumeration():
    """(n + 1) / (k + 1), against every order of a small space, and random's replays."""
    from hcomposer.search.tabular_report import random_expected_evals

    for n, k in [(5, 1), (5, 2), (6, 3), (4, 4)]:
        firsts = [
            min(i for i, item in enumerate(order, 1) if item < k)
            for order in itertools.permutations(range(n))
        ]
        assert random_expected_evals(n, k) == pytest.approx(statistics.fmean(firsts))
    with pytest.raises(ValueError):
        random_expected_evals(3, 0)
