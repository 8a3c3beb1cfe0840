"""``hcomposer run --rehearse``: every recipe's rehearsal end to end on the shipped fixtures
(search, the full target on the meta device, FSDP training on two processes killed after its
first sharded checkpoint and resumed, evaluation, report, rehearsal.json), the shrink itself,
and a broken stage failing the rehearsal."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hcomposer.accounting import params_from_shape
from hcomposer.architecture import Architecture
from hcomposer.data import rehearsal_assets
from hcomposer.io import read_json
from hcomposer.pipeline import rehearse
from hcomposer.pipeline.rehearse import declared_vocab, rehearsal, rehearse_run
from hcomposer.recipes import RECIPES, get_recipe
from hcomposer.runs import rehearsal_json

ROOT = Path(__file__).resolve().parents[1]
CORPUS, TOKENIZER = rehearsal_assets()


def _cli(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "hcomposer", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_the_shrink_keeps_the_recipes_structure_and_formats(tmp_path):
    paper = get_recipe("paper")
    toy = rehearsal(paper, tmp_path)
    # Same search space, sampler and proxy; fewer trials and proxy steps.
    kept = ("primitives", "layers", "sampler", "proxy", "strategy")
    assert all(getattr(toy.search, k) == getattr(paper.search, k) for k in kept)
    assert toy.search.trials == rehearse.TRIALS and toy.search.proxy_config.steps == 4
    # Same depth and scale strategy at the toy width; FSDP on the CPU.
    assert (toy.target_layers, toy.scale_strategy, toy.target_shape) == (32, "stretch", "tiny")
    t = toy.train
    assert t.fsdp and t.device == "cpu" and t.total_steps == rehearse.STEPS
    # The paper's 4 micro-steps a step, as many as each process's 2 rows allow.
    assert (paper.train.grad_accum, t.grad_accum) == (4, 2)
    # A streamed Hub corpus -> the shipped corpus, streamed; a Hub tokenizer -> the shipped one.
    assert t.data == f"hf:{CORPUS}" and t.tokenizer == str(TOKENIZER)
    assert [s for s in toy.eval.suites if s.startswith("lm-eval")] == ["lm-eval:hc_rehearsal_mc"]
    assert toy.eval.lm_eval_include == str(tmp_path)
    # The quickstart's embedded corpus and byte tokenizer stay; bpe:N shrinks.
    q = rehearsal(get_recipe("quickstart"), tmp_path).train
    assert (q.data, q.tokenizer) == (None, "byte")
    assert rehearse.rehearsal_tokenizer("bpe:32768") == "bpe:512"
    # The declared vocabulary of the paper's tokenizer, without downloading it.
    assert declared_vocab(paper.train.tokenizer)[0] == 128_256
    assert declared_vocab(str(TOKENIZER))[0] == 1024


def _check_record(out: Path, recipe: str) -> dict:
    record = read_json(rehearsal_json(out))
    stages = [s["stage"] for s in record["stages"]]
    assert stages[:4] == ["search", "aggregate", "scale", "target"]
    assert {"train_baseline", "train_composite", "eval_baseline", "eval_composite"} <= set(stages)
    assert stages[-1] == "report" and (out / "report.md").is_file()
    assert all(s["wall_seconds"] > 0 for s in record["stages"] if s["stage"] != "aggregate")
    state = read_json(out / "pipeline.json")["stages"]
    # The first training was killed after its first sharded checkpoint and went on to the end.
    trained = next(s for s in record["stages"] if s["stage"] == "train_baseline")["exercised"]
    assert "'killed_at_step': 2" in trained and "'status_after_kill': 'running'" in trained
    assert "'checkpoint_world_size': 2" in trained and "sharded" in trained
    assert state["train_baseline"]["step"] == rehearse.STEPS
    assert record["recipe"] == recipe
    return state


@pytest.mark.slow
def test_paper_rehearsal_end_to_end(tmp_path):
    out = tmp_path / "paper"
    t0 = time.monotonic()
    done = _cli("run", "--recipe", "paper", "--rehearse", "--out", str(out), "--no-progress")
    wall = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    state = _check_record(out, "paper")
    # The full target's structure on the meta device with Llama 3's 128,256-entry vocabulary:
    # (AF)*16 at its depth and shape is Llama-3.2-1B, exactly; the searched composite and its
    # matched baseline are counted too (their counts depend on the toy search's winner).
    target = state["target"]
    assert (target["reference"], target["reference_params"]) == ("AF" * 16, 1_235_814_400)
    assert target["vocab_size"] == 128_256 and target["layers"] == 32
    assert target["composite_params"] > 900_000_000 and target["baseline_params"] > 900_000_000
    # lm-eval ran the local task on both models.
    for role in ("baseline", "composite"):
        res = read_json(out / "train" / role / "eval" / "results.json")
        assert "hc_rehearsal_mc" in res["parts"]["lm-eval"]["tasks"]
    assert wall < 300, f"the paper rehearsal took {wall:.0f}s"


@pytest.mark.slow
def test_quickstart_rehearsal_end_to_end(tmp_path):
    out = tmp_path / "quick"
    t0 = time.monotonic()
    done = _cli("run", "--recipe", "quickstart", "--rehearse", "--out", str(out), "--no-progress")
    wall = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    state = _check_record(out, "quickstart")
    # Its seeds and re-scoring ran too (the trainings after the first in one process).
    assert "train_composite_seed1" in state and len(state["rescore"]["top"]) == 2
    assert state["target"]["vocab_size"] == 320  # the byte tokenizer's, rounded to 64
    assert wall < 300, f"the quickstart rehearsal took {wall:.0f}s"


def test_a_broken_stage_fails_the_rehearsal(tmp_path, monkeypatch):
    # The target stage breaks (as a change to the extrapolation would): the rehearsal stops
    # there, before any training, and the error propagates.
    def broken(*_a, **_k):
        raise RuntimeError("extrapolation broken")

    monkeypatch.setattr(rehearse, "target_on_meta", broken)
    monkeypatch.setattr(rehearse, "TRIALS", 2)
    recipe = get_recipe("quickstart")
    recipe = recipe.replace(search=recipe.search.replace(workers=1, proxy="mad:memorization"))
    with pytest.raises(RuntimeError, match="extrapolation broken"):
        rehearse_run(recipe, tmp_path / "broken")
    state = read_json(tmp_path / "broken" / "pipeline.json")["stages"]
    assert "scale" in state and "target" not in state and "train_baseline" not in state
    assert not rehearsal_json(tmp_path / "broken").exists()


def test_a_crashing_training_process_fails_the_rehearsal(tmp_path, monkeypatch):
    # The launched training dies (as a rank that crashes would) before its first checkpoint:
    # the rehearsal fails with its exit code, and the training stage is not marked done.
    crash = [sys.executable, "-c", "import sys; sys.exit(3)"]
    monkeypatch.setattr(rehearse, "_launch", lambda *_a: crash)
    monkeypatch.setattr(rehearse, "TRIALS", 2)
    recipe = get_recipe("quickstart")
    recipe = recipe.replace(search=recipe.search.replace(workers=1, proxy="mad:memorization"))
    with pytest.raises(RuntimeError, match=r"rc 3\) before it could be killed"):
        rehearse_run(recipe, tmp_path / "bad")
    state = read_json(tmp_path / "bad" / "pipeline.json")["stages"]
    assert "target" in state and "train_baseline" not in state


def test_every_recipe_has_a_rehearsal_test():
    assert set(RECIPES) == {"quickstart", "paper"}  # a new recipe needs its end-to-end test


@pytest.mark.slow
def test_proxy_rank_rehearsal_of_the_gpu_recipe(tmp_path):
    # The gpu study: a streamed Hub corpus and bpe:32768 become the shipped corpus and bpe:512.
    out = tmp_path / "pr"
    done = _cli("proxy-rank", "--recipe", "gpu", "--rehearse", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    record = read_json(rehearsal_json(out))
    assert [s["stage"] for s in record["stages"]] == ["target", "study"]
    assert "bpe:512" in record["stages"][1]["exercised"] and "spearman" in done.stdout
    # The full-size scale models (24 sublayers at 350m, 32,768 ids) counted on the meta device,
    # the same count as the accounting's formula.
    models = record["stages"][0]["details"]["models"]
    assert len(models) == 8 and all(m["vocab_size"] == 32768 for m in models.values())
    af = models["AFAFAF"]
    arch = Architecture.parse(af["pattern"], "350m")
    arch = arch.with_shape(arch.shape.replace(vocab_size=32768))
    assert (af["d_model"], af["params"]) == (1024, params_from_shape(arch))


@pytest.mark.slow
def test_isoflop_rehearsal_through_the_old_scaling_name(tmp_path):
    out = tmp_path / "iso"
    done = _cli("scaling", "AF", "AAFFFF", "--recipe", "gpu", "--rehearse", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    record = read_json(rehearsal_json(out))
    assert [s["stage"] for s in record["stages"]] == ["target", "sweep"]
    # The full sweep's largest model: its meta-device count equals the plan's (checked inside).
    target = record["stages"][0]["details"]
    assert target["models"]["largest"]["d_model"] == 2048 and target["budget"] == 1e20
    runs = read_json(out / "results.json")["runs"]
    assert len(runs) == 12 and all(r["status"] == "completed" for r in runs)
