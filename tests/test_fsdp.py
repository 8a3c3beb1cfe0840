"""torchrun FSDP2 on CPU (gloo, two processes): DDP's losses, exact resume from sharded
checkpoints, export, and the gathered path: one process, DDP and FSDP write the same tensors
for one model and step."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hcomposer.architecture import Architecture
from hcomposer.data import embedded_corpus_text
from hcomposer.errors import UserError
from hcomposer.io import read_json, read_jsonl
from hcomposer.model import build_model, lm_loss
from hcomposer.training import sharded as shards
from hcomposer.training.checkpoint import find_checkpoint, read_state, save_checkpoint
from hcomposer.training.step import make_optimizer, train_step
from hcomposer.training.trainer import TrainConfig, load_run, train

PATTERN = "SEAF"  # Mamba-2, MoE (a buffer FSDP does not sync by itself), attention, MLP
ARGS = ["--shape", "tiny", "--tokens", "768", "--batch-size", "4", "--seq-len", "32"]
ARGS += ["--grad-accum", "2", "--dtype", "fp32", "--log-every", "1", "--eval-every", "3"]
ARGS += ["--eval-tokens", "128", "--checkpoint-every", "3", "--no-progress", "--json"]


def _torchrun(tmp_path, *cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HCOMPOSER_CACHE": str(tmp_path / "cache")}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    res = subprocess.run([*run, *cmd], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def _losses(run_dir) -> dict[int, tuple[float, float | None]]:
    return {
        r["step"]: (r["loss"], r.get("val_loss")) for r in read_jsonl(run_dir / "metrics.jsonl")
    }


@pytest.mark.slow
def test_fsdp_matches_ddp_resumes_exactly_and_exports(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(embedded_corpus_text()[:30_000], encoding="utf-8")
    cli = ["-m", "hcomposer.cli", "train", PATTERN, "--data", str(data), *ARGS]
    _torchrun(tmp_path, *cli, "--out", str(tmp_path / "ddp"))
    _torchrun(tmp_path, *cli, "--fsdp", "--out", str(tmp_path / "fsdp"))
    # Interrupted after 3 steps (as a kill after the checkpoint would), then resumed.
    script = tmp_path / "stop.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from hcomposer.architecture import Architecture
            from hcomposer.training.trainer import TrainConfig, train
            config = TrainConfig(tokens=768, batch_size=4, seq_len=32, grad_accum=2,
                                 dtype="fp32", log_every=1, eval_every=3, eval_tokens=128,
                                 checkpoint_every=3, data={str(data)!r}, lr=1e-3,
                                 min_lr=1e-4, fsdp=True)
            train(Architecture.parse({PATTERN!r}, shape="tiny"), config,
                  {str(tmp_path / "resumed")!r}, progress=False, stop_at=3,
                  argv=["train", {PATTERN!r}])
            """
        )
    )
    _torchrun(tmp_path, str(script))
    assert read_state(find_checkpoint(tmp_path / "resumed"))["step"] == 3
    _torchrun(tmp_path, *cli, "--fsdp", "--resume", "--out", str(tmp_path / "resumed"))

    ddp, sharded, resumed = (_losses(tmp_path / n) for n in ("ddp", "fsdp", "resumed"))
    assert list(ddp) == list(range(1, 7)) and sharded.keys() == ddp.keys() == resumed.keys()
    for step in ddp:
        # Same batches, same initial weights: FSDP's reduce-scatter vs DDP's all-reduce only
        # reorders fp32 sums.
        assert sharded[step][0] == pytest.approx(ddp[step][0], rel=1e-5), step
        # A resumed run repeats the uninterrupted one's numbers exactly.
        assert resumed[step] == sharded[step], step
    assert sharded[6][1] == pytest.approx(ddp[6][1], rel=1e-5)
    for name in ("fsdp", "resumed"):
        assert read_json(tmp_path / name / "status.json")["status"] == "completed"

    # Each rank wrote its shards: the resumed run (which loaded the ones written at step 3
    # into freshly sharded processes) ends with the same tensors.
    for name in ("model", "optimizer"):
        ours = shards.read_whole(tmp_path / "fsdp" / "checkpoint" / name)
        again = shards.read_whole(tmp_path / "resumed" / "checkpoint" / name)
        assert ours.keys() == again.keys() and ours
        assert all(torch.equal(ours[k], again[k]) for k in ours), name
    # One process loads the sharded checkpoint (the MoE bias buffer included).
    model_f, arch, _, info = load_run(tmp_path / "fsdp")
    assert info["step"] == 6
    assert model_f.layers[1].mixer.expert_bias.abs().sum() > 0
    from transformers import AutoModelForCausalLM

    from hcomposer.export import export_run

    summary = export_run(tmp_path / "fsdp", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    x = torch.randint(0, arch.shape.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model_f(x), atol=1e-4, rtol=0)
    assert summary["kind"] == "hcomposer"
    assert "768" in (tmp_path / "hf" / "README.md").read_text()


def test_fsdp_without_torchrun_is_refused_before_writing(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(embedded_corpus_text()[:5_000], encoding="utf-8")
    config = TrainConfig(tokens=256, batch_size=2, seq_len=32, data=str(data), fsdp=True)
    with pytest.raises(UserError, match="torchrun"):
        train(Architecture.parse("AF", shape="tiny"), config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# Loads one process's checkpoint into a model replicated by DDP, then into one sharded by FSDP
# (both from other initial weights), and writes each again.
RESAVE = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hcomposer.model import build_model
from hcomposer.training import fsdp
from hcomposer.training.checkpoint import load_checkpoint, save_checkpoint
from hcomposer.training.step import make_optimizer

dist.init_process_group("gloo")
src, out = Path(sys.argv[1]) / "checkpoint", Path(sys.argv[2])
for mode in ("ddp", "fsdp"):
    model = build_model("SEAF", shape="tiny", seed=1 + dist.get_rank())
    if mode == "fsdp":
        model = fsdp.shard_model(model, torch.device("cpu"))
    opt = make_optimizer(model, lr=1.0, weight_decay=0.1)
    step = load_checkpoint(src, model, opt)["step"]
    if mode == "ddp":
        model = DistributedDataParallel(model).module
    if dist.get_rank() == 0:
        (out / mode).mkdir(parents=True)
    dist.barrier()
    written = save_checkpoint(out / mode, model, opt, {"step": step})
    assert (written is None) == (dist.get_rank() != 0), written
    dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_one_process_ddp_and_fsdp_checkpoints_hold_the_same_tensors(tmp_path):
    torch.set_num_threads(1)
    model = build_model("SEAF", shape="tiny", seed=0)  # tied head, MoE bias buffer
    assert model.lm_head.weight is model.embed.weight
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randint(0, model.arch.shape.vocab_size, (4, 33), generator=g)
        train_step(lambda a, b: lm_loss(model(a), b), [(x[:, :-1], x[:, 1:])], opt,
                   device=torch.device("cpu"), dtype="fp32", grad_clip=1.0)  # fmt: skip
    (tmp_path / "one").mkdir()
    save_checkpoint(tmp_path / "one", model, opt, {"step": 2})
    script = tmp_path / "resave.py"
    script.write_text(RESAVE)
    _torchrun(tmp_path, str(script), str(tmp_path / "one"), str(tmp_path))

    one = tmp_path / "one" / "checkpoint"
    assert model.layers[1].mixer.expert_bias.abs().sum() > 0
    for mode in ("ddp", "fsdp"):
        again = tmp_path / mode / "checkpoint"
        for name in ("model.safetensors", "optimizer.safetensors"):
            ours, theirs = load_file(one / name), load_file(again / name)
            assert ours.keys() == theirs.keys(), (mode, name)
            assert all(torch.equal(ours[k], theirs[k]) for k in ours), (mode, name)
            with safe_open(one / name, "pt") as a, safe_open(again / name, "pt") as b:
                assert a.metadata() == b.metadata(), (mode, name)
        # Keyed by name, the tied head stored once; the same groups and scalars.
        assert "layers.0.mixer.in_proj.weight.exp_avg" in theirs
        assert "lm_head.weight" not in load_file(again / "model.safetensors")
        ours_state, theirs_state = read_state(one), read_state(again)
        assert ours_state["optimizer"] == theirs_state["optimizer"], mode
