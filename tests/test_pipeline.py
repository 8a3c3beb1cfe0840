"""hcomposer run end to end on a tiny recipe: stages, report, resume after SIGKILL, compare."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hcomposer.errors import UserError
from hcomposer.evaluation.efficiency import EfficiencyConfig
from hcomposer.evaluation.niah import NIAHConfig
from hcomposer.pipeline import matched_baseline, rescore, run_pipeline, seed_noise
from hcomposer.recipes import EvalConfig, Recipe
from hcomposer.search import SearchConfig, load_trials
from hcomposer.search.objectives import synthetic_objective, synthetic_score
from hcomposer.training import TrainConfig

SMOKE = Recipe(
    name="smoke",
    search=SearchConfig(
        primitives=("A", "F", "S"),
        layers=4,
        trials=5,
        sampler="random",
        proxy="synthetic",
        shape="tiny",
    ),
    target_shape="tiny",
    target_layers=8,
    scale_strategy="stack",
    train=TrainConfig(
        tokens=4096,
        batch_size=4,
        seq_len=64,
        eval_every=8,
        eval_tokens=512,
        checkpoint_every=4,
        log_every=2,
        warmup=2,
    ),
    eval=EvalConfig(
        suites=("loss", "niah", "efficiency"),
        niah=NIAHConfig(lengths=(192,), depths=(0.0, 1.0), trials=1),
        efficiency=EfficiencyConfig(
            min_len=32, max_len=64, repeats=1, decode_steps=2, train_batch=1
        ),
    ),
    train_seeds=2,
    rescore_top=3,
    rescore_seeds=2,
)

_SCRIPT = """
import sys, json
from hcomposer.pipeline import run_pipeline
from hcomposer.recipes import Recipe
recipe = Recipe.from_dict(json.loads(sys.argv[2]))
run_pipeline(recipe, sys.argv[1], progress=False)
"""


def test_matched_baseline_is_closest():
    from hcomposer.accounting import count_costs
    from hcomposer.architecture import Architecture
    from hcomposer.shapes import get_shape

    shape = get_shape("tiny")
    target = count_costs(Architecture.parse("ASFSASFS", shape)).params_total
    pattern, params = matched_baseline(target, shape)
    n = len(pattern) // 2
    assert pattern == "AF" * n
    for other in (n - 1, n + 1):
        if other >= 1:
            p = count_costs(Architecture.parse("AF" * other, shape)).params_total
            assert abs(p - target) >= abs(params - target)


def test_pipeline_resumes_after_kill_and_reports(tmp_path: Path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(out), json.dumps(SMOKE.to_dict())],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # Kill it once the baseline's training has written its first checkpoint.
    ckpt = out / "train" / "baseline" / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stages = json.loads((out / "pipeline.json").read_text())["stages"]
    assert {"search", "aggregate", "scale"} <= set(stages)
    assert "train_baseline" not in stages
    trials_before = load_trials(out / "search")

    state = run_pipeline(SMOKE, out, progress=False)
    for stage in ("train_baseline", "train_composite", "eval_baseline", "eval_composite", "report"):
        assert stage in state["stages"], stage
    # The search was not run again: the same trials, no new ones.
    trials_after = load_trials(out / "search")
    assert [t["number"] for t in trials_after] == [t["number"] for t in trials_before]
    assert len([t for t in trials_after if t["state"] == "COMPLETE"]) == 5
    # The resumed training reached its budget and logged each step once.
    steps = [
        json.loads(x)["step"]
        for x in (out / "train/baseline/metrics.jsonl").open()
        if '"loss"' in x
    ]
    assert steps == sorted(set(steps)) and max(steps) == 4096 // (4 * 64)
    report = (out / "report.md").read_text()
    scale = state["stages"]["scale"]
    assert scale["composite"] in report and scale["baseline"] in report
    # The report names what the search ranked on.
    assert "Proxy `synthetic` at shape `tiny`, random sampler, 4 positions of A/F/S." in report
    # It says how far the proxy is known to rank like scale, beside the free rankings.
    assert "## How far to trust the proxy" in report and "has not been measured" in report
    assert "rank by has S/D" in report
    # Efficiency of both models timed together: paired ratios with their spread.
    assert "Efficiency, paired" in report and "decode@64" in report
    paired = json.loads((out / "compare/compare.json").read_text())["efficiency_interleaved"]
    assert (
        paired["reference"] == "baseline" and paired["ratios"]["composite"]["decode@64"]["n"] == 1
    )
    assert len(scale["composite"]) == 8 and set(scale["baseline"]) == {"A", "F"}
    for png in (
        "trials.png",
        "patterns.png",
        "compare/loss.png",
        "compare/efficiency.png",
        "compare/niah_0.png",
    ):
        assert (out / png).stat().st_size > 1000, png
    _check_seed_noise(out, state)
    # A second call finds everything done and changes nothing.
    before = (out / "report.md").stat().st_mtime_ns
    run_pipeline(SMOKE, out, progress=False)
    assert (out / "report.md").stat().st_mtime_ns == before
    _check_rescore_resumes(out)


def _check_rescore_resumes(out: Path) -> None:
    """A rerun of the re-scoring keeps every saved evaluation and runs only the missing ones."""
    data = json.loads((out / "pipeline.json").read_text())
    for stage in ("rescore", "report"):
        del data["stages"][stage]
    (out / "pipeline.json").write_text(json.dumps(data))
    saved = json.loads((out / "rescore.json").read_text())
    first, second = list(saved)[:2]
    saved[first]["1"] = 0.123  # a sentinel: kept, so not evaluated again
    del saved[second]["2"]  # missing: evaluated again
    (out / "rescore.json").write_text(json.dumps(saved))
    state = run_pipeline(SMOKE, out, progress=False)
    rows = {r["pattern"]: r["scores"] for r in state["stages"]["rescore"]["top"]}
    assert rows[first]["1"] == 0.123
    assert rows[second]["2"] == pytest.approx(synthetic_score(second, 2))
    assert json.loads((out / "rescore.json").read_text())[second]["2"] == rows[second]["2"]


def test_seed_noise_by_hand():
    b, c = [2.0, 2.2, 2.1], [1.9, 2.3]
    noise = seed_noise(b, c)
    # s_p^2 = (sum of squares about each mean) / (n_a + n_b - 2) = (0.02 + 0.08) / 3
    pooled = (0.1 / 3) ** 0.5
    threshold = 2 * pooled * (1 / 3 + 1 / 2) ** 0.5
    assert noise["pooled_std"] == pytest.approx(pooled)
    assert noise["threshold"] == pytest.approx(threshold)
    assert noise["diff"] == pytest.approx(2.1 - 2.1) and noise["inside_noise"] is True
    far = seed_noise([2.0, 2.01], [1.5, 1.51])
    assert far["inside_noise"] is False and far["diff"] == pytest.approx(-0.5)
    # One seed each: no std, no verdict (never a claim without its noise).
    one = seed_noise([2.0], [1.5])
    assert one["baseline_std"] is None and one["inside_noise"] is None


def test_rescore_in_worker_processes_gives_the_in_process_scores():
    cfg = SearchConfig(primitives="AF", layers=3, proxy="synthetic", shape="tiny", workers=2)
    jobs = [(p, s) for p in ("AFA", "FFA", "AAF") for s in (1, 2)]
    got = {(p, s): v for p, s, v in rescore(synthetic_objective, cfg, jobs)}
    assert got == {(p, s): synthetic_score(p, s) for p, s in jobs}
    alone = cfg.replace(workers=1)
    assert {(p, s): v for p, s, v in rescore(synthetic_objective, alone, jobs)} == got


def _check_seed_noise(out: Path, state: dict) -> None:
    """Seed runs exist, the noise numbers follow from the per-seed losses, the report says it."""
    import math
    import statistics

    losses = {}
    for role in ("baseline", "composite"):
        runs = [out / "train" / role, out / "train" / f"{role}-seed1"]
        for run in runs:
            assert (run / "metrics.jsonl").is_file() and (run / "eval/results.json").is_file()
        assert json.loads((runs[1] / "run.json").read_text())["config"]["train"]["seed"] == 1
        # NIAH and efficiency on seed 0's run only.
        assert "niah" in json.loads((runs[0] / "eval/results.json").read_text())["parts"]
        assert "niah" not in json.loads((runs[1] / "eval/results.json").read_text())["parts"]
        losses[role] = [
            json.loads((r / "eval/results.json").read_text())["parts"]["loss"]["loss"] for r in runs
        ]
    noise = state["stages"]["report"]["noise"]
    loss = noise["loss"]
    for role in ("baseline", "composite"):
        assert loss[role] == pytest.approx(losses[role])
        assert loss[f"{role}_mean"] == pytest.approx(statistics.fmean(losses[role]))
        assert loss[f"{role}_std"] == pytest.approx(statistics.stdev(losses[role]))
    b, c = losses["baseline"], losses["composite"]
    diff = statistics.fmean(c) - statistics.fmean(b)
    pooled = math.sqrt((statistics.variance(b) + statistics.variance(c)) / 2)  # n = 2 each
    threshold = 2 * pooled * math.sqrt(1 / 2 + 1 / 2)
    assert loss["diff"] == pytest.approx(diff) and loss["threshold"] == pytest.approx(threshold)
    assert loss["inside_noise"] == (abs(diff) < threshold)
    report = (out / "report.md").read_text()
    sentence = "inside the noise." if abs(diff) < threshold else "outside the noise"
    assert sentence in report and f"{diff:+.4f}" in report
    # The top 3 patterns re-scored on proxy seeds 1 and 2 (the synthetic proxy: known scores).
    top = noise["rescore"]
    assert len(top) == 3
    for row in top:
        scores = [synthetic_score(row["pattern"], s) for s in (0, 1, 2)]
        assert [row["scores"][str(s)] for s in (0, 1, 2)] == pytest.approx(scores)
        assert row["mean"] == pytest.approx(statistics.fmean(scores))
        assert row["std"] == pytest.approx(statistics.stdev(scores))
        assert f"{row['mean']:.4f} ± {row['std']:.4f}" in report


def test_pipeline_refuses_other_configuration(tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "pipeline.json").write_text(json.dumps({"recipe": {"name": "other"}, "stages": {}}))
    with pytest.raises(UserError, match="another configuration"):
        run_pipeline(SMOKE, out, progress=False)
    assert json.loads((out / "pipeline.json").read_text())["recipe"] == {"name": "other"}


def test_run_cli_bad_input_writes_nothing(tmp_path: Path):
    from hcomposer.cli import main

    out = tmp_path / "x"
    assert main(["run", "--recipe", "nope", "--out", str(out)]) == 2
    assert main(["run", "--trials", "0", "--out", str(out)]) == 2
    assert main(["run", "--proxy", "mad:nope", "--out", str(out)]) == 2
    assert main(["run", "--proxy", "bogus", "--out", str(out)]) == 2
    assert not out.exists()


def test_run_proxy_override_reaches_the_search_and_is_recorded(tmp_path: Path):
    """`hcomposer run --proxy` changes the search's proxy, nothing else, and the resolved
    recipe says so: a run folder made with one proxy refuses to resume with another."""
    import argparse

    from hcomposer.commands.run_cmd import _recipe
    from hcomposer.recipes import get_recipe

    def args(**kw):
        base = dict(recipe="quickstart", trials=None, tokens=None, seed=None, proxy=None)
        base.update(data=None, tokenizer=None)
        return argparse.Namespace(**{**base, **kw})

    plain = _recipe(args())
    assert plain == get_recipe("quickstart")
    fuzzy = _recipe(args(proxy="mad:fuzzy"))
    assert fuzzy.search.proxy == "mad:fuzzy_in_context_recall"
    assert _recipe(args(proxy=" mad: fuzzy_in_context_recall")) == fuzzy  # one spelling
    assert fuzzy.replace(search=fuzzy.search.replace(proxy=plain.search.proxy)) == plain
    out = tmp_path / "run"
    out.mkdir()
    (out / "pipeline.json").write_text(json.dumps({"recipe": plain.to_dict(), "stages": {}}))
    from hcomposer.pipeline import State

    assert State(out, plain, None).data["recipe"]["search"]["proxy"] == plain.search.proxy
    with pytest.raises(UserError, match="another configuration"):
        State(out, fuzzy, None)


def test_compare_cli(tmp_path: Path, capsys):
    """compare on two tiny trained runs: ratios against the first, report files."""
    from hcomposer.architecture import Architecture
    from hcomposer.cli import main
    from hcomposer.training.trainer import TrainConfig, train

    cfg = TrainConfig(
        tokens=1024, batch_size=4, seq_len=32, eval_every=4, eval_tokens=256, log_every=2, warmup=1
    )
    runs = []
    for name, pattern in (("base", "AFAF"), ("hyb", "AFSF")):
        train(Architecture.parse(pattern, "tiny"), cfg, tmp_path / name, progress=False)
        runs.append(str(tmp_path / name))
    assert main(["compare", *runs, "--out", str(tmp_path / "cmp"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["metric"]: r for r in data["rows"]}
    p = rows["parameters"]
    assert p["ratios"][0] == 1.0 and p["ratios"][1] == pytest.approx(
        p["values"][1] / p["values"][0]
    )
    assert rows["state bytes / sequence"]["values"][0] == 0
    assert rows["state bytes / sequence"]["values"][1] > 0
    assert (tmp_path / "cmp" / "compare.md").read_text().count("AFSF") >= 1
    assert main(["compare", str(tmp_path / "nothing"), "--out", str(tmp_path / "c2")]) == 2
    assert not (tmp_path / "c2").exists()
