"""The proxy zoo against a ruler: known answers for the judge, and the study's zoo built
from synthetic files (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hcomposer.proxies.ruler import RulerConfig
from hcomposer.proxies.ruler_study import write_zoo
from hcomposer.proxies.zoo import (
    TRIVIAL,
    afwe_only,
    fit_ridge,
    judge,
    plot_zoo,
    structure,
    trivial_scores,
    zoo_markdown,
)
from hcomposer.stats import spearman

ROOT = Path(__file__).resolve().parents[1]
PATS = ["AFAFAF", "SFSFSF", "DFDFDF", "AAFFFF", "FFFFFF", "AEAEAE", "WFWFWF", "SSFFAA", "FAFAFA"]
# Losses at scale: S/D patterns best, then by how much attention comes early.
LOSS = {"SFSFSF": 4.00, "DFDFDF": 4.02, "SSFFAA": 4.05, "AFAFAF": 4.30, "AAFFFF": 4.35,
        "WFWFWF": 4.40, "AEAEAE": 4.32, "FAFAFA": 4.45, "FFFFFF": 5.20}  # fmt: skip
PARAMS = {p: 1000 + 10 * i for i, p in enumerate(PATS)}


def test_judge_known_answers():
    perfect = {p: -LOSS[p] for p in PATS}
    reversed_ = {p: LOSS[p] for p in PATS}
    scores = {"perfect": perfect, "reversed": reversed_, **trivial_scores(PATS, PARAMS)}
    v = {x.name: x for x in judge(scores, LOSS, cpu={"perfect": 12.0}, n_boot=200)}
    assert v["perfect"].spearman == pytest.approx(1.0)
    assert v["perfect"].kendall == pytest.approx(1.0)
    assert v["reversed"].spearman == pytest.approx(-1.0)
    assert v["perfect"].cpu_seconds == 12.0 and v["perfect"].n == len(PATS)
    # The best trivial ranker here is has-S/D or count of S+D; the perfect proxy beats it.
    best = v["perfect"].best_trivial
    assert best in ("has S/D", "count of S+D")
    d = v["perfect"].diff_best_trivial
    assert d[0] == pytest.approx(1.0 - v[best].spearman) and d[1] <= d[0] <= d[2]
    # Within A/F/W/E only, has-S/D is constant: no Spearman; the perfect proxy keeps 1.
    assert v["has S/D"].afwe_spearman is None
    assert v["perfect"].afwe_spearman == pytest.approx(1.0)
    assert v["perfect"].afwe_n == sum(afwe_only(p) for p in PATS)
    table = zoo_markdown(list(v.values()))
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert lines[0].startswith("| perfect") and all(
        any(line.startswith(f"| {t}") for line in lines[-len(TRIVIAL) :]) for t in TRIVIAL
    )


def test_plot_zoo_writes_a_png(tmp_path):
    scores = {"perfect": {p: -LOSS[p] for p in PATS}, **trivial_scores(PATS, PARAMS)}
    path = plot_zoo(judge(scores, LOSS, n_boot=50), tmp_path / "zoo.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _synthetic_study(out: Path) -> dict:
    """A ruler study folder written by hand: plan.json, runs.jsonl, proxy_scores.jsonl."""
    split = {"dev": PATS[:5], "heldout": PATS[5:] + ["SSSSSS"], "check": []}
    (out / "plan.json").write_text(json.dumps({"non_embedding_active_params": {
        **PARAMS, "SSSSSS": 999}}))  # fmt: skip
    runs, proxies = [], []
    for p in PATS:
        for seed in (0, 1):
            runs.append({"pattern": p, "role": "final", "seed": seed, "flag": None,
                         "test_loss": LOSS[p] + 0.01 * seed, "lr": 0.003})  # fmt: skip
        for seed in (0, 1, 2):
            tasks = {
                # good: its loss tracks the ruler; inverted: the other way round
                "good": {"accuracy": 0.5, "loss": LOSS[p] + 0.001 * seed},
                "inverted": {"accuracy": 0.5, "loss": -LOSS[p]},
                "fuzzy_in_context_recall": {"accuracy": 1 / LOSS[p], "loss": 1.0},
            }
            proxies.append({"pattern": p, "kind": "mad6", "seed": seed, "score": -LOSS[p],
                            "tasks": tasks, "cpu_seconds": 40.0 + seed})  # fmt: skip
        proxies.append({"pattern": p, "kind": "text/32", "seed": 0, "val_loss": LOSS[p] + 1,
                        "cpu_seconds": 9.0, "status": "completed"})  # fmt: skip
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    (out / "proxy_scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in proxies))
    return split


def test_study_zoo_from_files(tmp_path):
    """write_zoo reads runs.jsonl, proxy_scores.jsonl and plan.json only; the task choice of
    'MAD by task loss' is made on the dev patterns (an inverted task is dropped)."""
    out = tmp_path
    split = _synthetic_study(out)
    text = write_zoo(out, split, RulerConfig(), n_boot=100)
    res = json.loads((out / "zoo.json").read_text())
    assert res["notes"]["MAD by task loss: tasks kept (chosen on dev)"] == ["good"]
    held = {v["name"]: v for v in res["sets"]["heldout"]}
    # SSSSSS has no ruler loss: the held-out set is judged on the 4 that have one.
    assert held["MAD six tasks (accuracy)"]["n"] == 4
    assert held["MAD by task loss"]["spearman"] == pytest.approx(1.0)
    assert held["MAD six tasks (accuracy)"]["cpu_seconds"] == 41.0
    assert held["text, 1/32 of the ruler's tokens"]["cpu_seconds"] == 9.0
    assert set(TRIVIAL) - {"has S/D", "count of S+D"} <= set(held)
    assert "## heldout patterns" in text and (out / "zoo.png").is_file()


def test_proxy_rank_reports_a_ruler_study_from_its_files(tmp_path, capsys):
    from hcomposer.cli import main

    out = tmp_path / "ruler"
    out.mkdir()
    split = _synthetic_study(out)
    (out / "split.json").write_text(json.dumps(split))
    (out / "ruler.json").write_text(json.dumps(RulerConfig().to_dict()))
    before = (out / "runs.jsonl").read_bytes()
    assert main(["proxy-rank", "--out", str(out), "--json", "--boot", "100"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {v["name"] for v in doc["zoo"]["sets"]["heldout"]} >= {"MAD by task loss", *TRIVIAL[2:]}
    assert doc["ruler"]["reliability"]["all"]["n"] == len(PATS)
    assert (out / "runs.jsonl").read_bytes() == before  # nothing trained, the log untouched
    assert (out / "result.md").is_file() and (out / "zoo.md").is_file()
    # Options that would train are refused on a ruler folder.
    assert main(["proxy-rank", "--out", str(out), "--tokens", "100000"]) == 2
    assert "ruler study" in capsys.readouterr().err


def test_fit_ridge_scores_dev_out_of_sample_and_ranks_held_out():
    """The fitted combination's dev scores are leave-one-out: a dev pattern's own target
    cannot move its own score. Held-out patterns are scored by the fit on all of dev."""
    import numpy as np

    rng = np.random.default_rng(0)
    pats = [f"P{i}" for i in range(20)]
    signal = {p: float(i) for i, p in enumerate(pats)}
    feats = {p: {"signal": signal[p], "noise": float(rng.normal())} for p in pats}
    loss = {p: 5.0 - 0.1 * signal[p] for p in pats}
    dev, held = pats[::2], pats[1::2]
    scores, info = fit_ridge(feats, loss, dev)
    assert set(scores) == set(pats) and info["dev_n"] == len(dev)
    assert abs(info["weights"]["signal"]) > abs(info["weights"]["noise"])
    held_rho = spearman([scores[p] for p in held], [-loss[p] for p in held])
    assert held_rho == pytest.approx(1.0)
    # Leave-one-out: change one dev pattern's target wildly; its own score stays put
    # when the penalty is the same (held fixed by giving one alpha).
    a = (info["alpha"],)
    before, _ = fit_ridge(feats, loss, dev, alphas=a)
    after, _ = fit_ridge(feats, {**loss, dev[3]: 100.0}, dev, alphas=a)
    assert after[dev[3]] == pytest.approx(before[dev[3]])
    assert after[dev[4]] != pytest.approx(before[dev[4]])  # the others' fits did see it
    # Too few dev patterns: no fit, and the reason says so.
    reason = "4 dev patterns with every feature (6 needed)"
    assert fit_ridge(feats, loss, dev[:4]) == ({}, {"reason": reason})


def test_study_zoo_fits_combinations_on_dev_only(tmp_path):
    split = _synthetic_study(tmp_path)
    split = {**split, "dev": PATS[:6], "heldout": PATS[6:]}
    write_zoo(tmp_path, split, RulerConfig(), n_boot=50)
    res = json.loads((tmp_path / "zoo.json").read_text())
    note = res["notes"]["fitted on dev: MAD task losses + structure"]
    assert note["dev_n"] == 6 and "good" in note["features"] and "count of S+D" in note["features"]
    held = {v["name"]: v for v in res["sets"]["heldout"]}
    fitted = held["fitted on dev: MAD task losses + structure"]
    assert fitted["n"] == 3 and fitted["cpu_seconds"] == 41.0
    assert held["fitted on dev: text 1/32 + structure"]["cpu_seconds"] == 9.0


def test_structure_counts():
    s = structure("[A|S]FWEDA", 1000.0)
    assert s["count of S+D"] == 2 and s["count of A"] == 2 and s["count of W"] == 1
    assert s["count of E"] == 1 and s["log parameters"] == pytest.approx(math.log(1000.0))


def test_task_cpu_is_the_task_share_of_the_record():
    from hcomposer.proxies.ruler_study import task_cpu

    rec = {"cpu_seconds": 60.0, "tasks": {"a": {"seconds": 10.0}, "b": {"seconds": 30.0}}}
    assert task_cpu(rec, "a") == pytest.approx(15.0) and task_cpu(rec, "b") == pytest.approx(45.0)
    old = {"cpu_seconds": 60.0, "tasks": {"a": {}, "b": {}}}  # before tasks were timed
    assert task_cpu(old, "a") == 60.0


def test_fit_ridge_leave_one_out_has_no_intercept_artefact():
    """Features that carry nothing: a strong penalty predicts ~0 for every left-out pattern,
    not the mean of the others (which ranks exactly backwards, Spearman -1)."""
    pats = [f"P{i}" for i in range(10)]
    feats = {p: {"x": float((i * 7) % 10)} for i, p in enumerate(pats)}
    loss = {p: float(i) for i, p in enumerate(pats)}
    _, info = fit_ridge(feats, loss, pats, alphas=(1e6,))
    assert info["loo_spearman"]["1000000.0"] > -0.9
