"""Aggregation: exact 1-D k-means, n0/nc/best votes, ties, bad input, the CLI."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from hcomposer.cli import main
from hcomposer.errors import UserError
from hcomposer.io import append_jsonl
from hcomposer.scaling.aggregate import aggregate, aggregate_details, kmeans_1d


def _trials(rows):
    return [
        {"number": i, "pattern": p, "score": s, "state": "COMPLETE"}
        for i, (p, s) in enumerate(rows)
    ]


def _sse(values, labels):
    total = 0.0
    for lab in set(labels):
        xs = [v for v, l in zip(values, labels) if l == lab]
        m = sum(xs) / len(xs)
        total += sum((x - m) ** 2 for x in xs)
    return total


def _brute_kmeans_sse(values, k):
    """Best SSE over every split of the sorted values into k contiguous groups."""
    xs = sorted(values)
    n = len(xs)
    best = float("inf")

    def rec(start, groups_left, acc):
        nonlocal best
        if groups_left == 1:
            seg = xs[start:]
            m = sum(seg) / len(seg)
            best = min(best, acc + sum((x - m) ** 2 for x in seg))
            return
        for end in range(start + 1, n - groups_left + 2):
            seg = xs[start:end]
            m = sum(seg) / len(seg)
            rec(end, groups_left - 1, acc + sum((x - m) ** 2 for x in seg))

    rec(0, k, 0.0)
    return best


def test_kmeans_exact_against_brute_force_and_sklearn():
    from sklearn.cluster import KMeans

    rng = random.Random(0)
    for trial in range(6):
        values = [rng.gauss(0, 1) for _ in range(11)]
        labels = kmeans_1d(values, 3)
        # Exact: equal to the best contiguous split found by brute force.
        assert _sse(values, labels) == pytest.approx(_brute_kmeans_sse(values, 3), abs=1e-9)
        km = KMeans(n_clusters=3, n_init=10, random_state=trial).fit(np.array(values)[:, None])
        assert _sse(values, labels) <= km.inertia_ + 1e-9
        # Labels are ordered by cluster mean.
        means = [np.mean([v for v, l in zip(values, labels) if l == j]) for j in range(3)]
        assert means == sorted(means)


def test_kmeans_fewer_distinct_values_than_k_and_ties_stay_together():
    assert kmeans_1d([1.0, 1.0, 2.0], 5) == [0, 0, 1]
    assert kmeans_1d([3.0], 5) == [0]
    labels = kmeans_1d([0.0, 0.0, 0.0, 10.0, 10.0, 5.0], 2)
    assert labels[3] == labels[4] and labels[0] == labels[1] == labels[2]


def test_n0_majority_vote_in_top_cluster():
    # Top cluster (scores near 0.9): AAFFFF, AAFFFA, AFFFFF; the low cluster must not vote.
    rows = [
        ("AAFFFF", 0.91),
        ("AAFFFA", 0.90),
        ("AFFFFF", 0.89),
        ("FFFFFF", 0.10),
        ("FFFFFA", 0.11),
        ("FFAAAA", 0.12),
        ("FAAAAA", 0.40),
        ("FFAAAF", 0.41),
    ]
    d = aggregate_details(_trials(rows), "n0", k=3)
    assert [c.pattern for c in d.kept] == ["AAFFFF", "AAFFFA", "AFFFFF"]
    assert d.pattern == "AAFFFF"
    assert d.votes[1]["votes"] == {"A": 2, "F": 1}
    assert aggregate(_trials(rows), "best") == "AAFFFF"


def test_n0_nc_best_differ_on_a_hand_checked_case():
    # Kept (one cluster, far above AAA): AFF 1.0, AFA .99, FFA .98, FAA .97, FFF .96.
    rows = [("AFF", 1.0), ("AFA", 0.99), ("FFA", 0.98), ("FAA", 0.97), ("FFF", 0.96)]
    t = _trials([*rows, ("AAA", -10.0)])
    # n0: pos1 F3/A2 -> F; pos2 F4/A1 -> F; pos3 A3/F2 -> A.
    assert aggregate(t, "n0", k=2) == "FFA"
    # nc (c=1): pos1 F; pos2 among F..: FFA FAA FFF -> F2/A1 -> F; pos3 among .F.:
    # AFF AFA FFA FFF -> A2/F2, a tie won by the best holder AFF -> F.
    d = aggregate_details(t, "nc", c=1, k=2)
    assert d.pattern == "FFF"
    assert [v["voters"] for v in d.votes] == [5, 3, 4]
    assert d.votes[2]["votes"] == {"F": 2, "A": 2}
    # best: the single best trial.
    assert aggregate(t, "best", k=2) == "AFF"
    # c larger than the position compares the whole prefix: pos3 among FF.: FFA, FFF -> tie
    # won by FFA (0.98 > 0.96).
    assert aggregate(t, "nc", c=5, k=2) == "FFA"


def test_repeated_pattern_is_one_candidate_with_mean_score():
    rows = [("AF", 1.0), ("FA", 0.7), ("FA", 0.9), ("FF", 0.1)]
    d = aggregate_details(_trials(rows), "n0", k=5)
    assert d.n_trials == 4 and d.n_candidates == 3
    assert [(c.pattern, c.n_trials) for c in d.kept] == [("AF", 1)]
    # FA (mean 0.8) is one candidate, in its own cluster since k=5 > 3 distinct scores.
    assert len(d.clusters) == 3 and d.clusters[1] == {
        "size": 1,
        "mean": 0.8,
        "min": 0.8,
        "max": 0.8,
    }


def test_nc_agreeing_pool_never_empty_property():
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(1, 12)
        rows = [("".join(rng.choice("AFS") for _ in range(5)), rng.random()) for _ in range(n)]
        for c in (1, 2, 4):
            d = aggregate_details(_trials(rows), "nc", c=c, k=rng.randint(1, 5))
            assert all(v["voters"] >= 1 for v in d.votes)
            # The result agrees with at least one kept candidate on its last c+1 positions.
            tail = d.pattern[-(c + 1) :]
            assert any(x.pattern[-(c + 1) :] == tail for x in d.kept)


def test_groups_are_one_position():
    rows = [("[A|S]F", 1.0), ("[A|S]S", 0.99), ("AF", 0.98), ("SF", -1.0)]
    d = aggregate_details(_trials(rows), "n0", k=2)
    assert d.pattern == "[A|S]F"
    assert d.votes[0]["votes"] == {"[A|S]": 2, "A": 1}


def test_only_completed_scored_trials_count():
    trials = _trials([("AA", 1.0), ("FF", 0.5)])
    trials += [
        {"number": 9, "pattern": "FA", "score": 99.0, "state": "FAIL"},
        {"number": 10, "pattern": "FA", "score": None, "state": "COMPLETE"},
        {"number": 11, "pattern": "FA", "score": float("nan"), "state": "COMPLETE"},
        {"number": 12, "pattern": "FA", "score": 98.0, "state": "RUNNING"},
    ]
    d = aggregate_details(trials, "best")
    assert d.pattern == "AA" and d.n_trials == 2


def test_bad_input():
    with pytest.raises(UserError, match="different lengths"):
        aggregate(_trials([("AF", 1.0), ("AFF", 0.5)]))
    with pytest.raises(UserError, match="no completed"):
        aggregate([{"pattern": "AF", "score": 1.0, "state": "FAIL"}])
    with pytest.raises(UserError, match="method"):
        aggregate(_trials([("AF", 1.0)]), method="n3")
    with pytest.raises(UserError, match="--c"):
        aggregate(_trials([("AF", 1.0)]), method="nc", c=0)


def test_cli_on_trials_jsonl(tmp_path, capsys):
    for i, (p, s) in enumerate([("AAFF", 0.9), ("AAFA", 0.88), ("FFFF", 0.1), ("AFFF", 0.87)]):
        append_jsonl(
            tmp_path / "trials.jsonl", {"number": i, "pattern": p, "score": s, "state": "COMPLETE"}
        )
    assert main(["aggregate", str(tmp_path), "--method", "n0", "--k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pattern"] == "AAFF" and out["method"] == "n0"
    assert [k["pattern"] for k in out["kept"]] == ["AAFF", "AAFA", "AFFF"]
    assert len(out["votes"]) == 4
    assert main(["aggregate", str(tmp_path), "--method", "best"]) == 0
    assert "AAFF" in capsys.readouterr().out


def test_cli_bad_input(tmp_path, capsys):
    assert main(["aggregate", str(tmp_path / "missing")]) == 2
    assert main(["aggregate", str(tmp_path)]) == 2  # exists, holds no search
    append_jsonl(tmp_path / "trials.jsonl", {"pattern": "AF", "score": 1, "state": "FAIL"})
    assert main(["aggregate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error:") for line in err)


def test_cli_reads_a_real_search_folder(tmp_path, capsys):
    from hcomposer.search.loop import load_trials

    out = tmp_path / "search"
    argv = [
        "search",
        "--proxy",
        "synthetic",
        "--primitives",
        "AF",
        "--layers",
        "4",
        "--trials",
        "10",
        "--sampler",
        "random",
        "--out",
        str(out),
        "--json",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    # The engine's trials.jsonl would also do; prove the study itself is read.
    (out / "trials.jsonl").unlink()
    assert main(["aggregate", str(out), "--method", "nc", "--k", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["source"] == "study"
    trials = load_trials(out)
    assert doc["pattern"] == aggregate(trials, "nc", c=1, k=3)
    done = {t["pattern"] for t in trials if t["state"] == "COMPLETE"}
    assert doc["n_candidates"] == len(done) and {k["pattern"] for k in doc["kept"]} <= done
