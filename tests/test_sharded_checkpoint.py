"""Sharded checkpoints (``hcomposer.training.sharded``): a round trip in one process, the
checks that refuse a damaged or foreign one, and two FSDP processes (gloo) killed with SIGKILL
after a checkpoint and resumed, which end where an uninterrupted run ends."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time

import psutil
import pytest
import torch

from hcomposer.architecture import Architecture
from hcomposer.data import embedded_corpus_text
from hcomposer.errors import UserError
from hcomposer.io import read_json, read_jsonl
from hcomposer.model import build_model, lm_loss
from hcomposer.training import sharded
from hcomposer.training.checkpoint import (
    FORMAT_SHARDED,
    load_checkpoint,
    read_optimizer_state,
    read_state,
    save_checkpoint,
    usable_checkpoint,
)
from hcomposer.training.step import make_optimizer, train_step
from hcomposer.training.trainer import load_run


def _trained(steps: int, seed: int = 0):
    model = build_model("SEAF", shape="tiny", seed=seed)  # tied head, MoE bias buffer
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, model.arch.shape.vocab_size, (4, 33), generator=g)
        train_step(lambda a, b: lm_loss(model(a), b), [(x[:, :-1], x[:, 1:])], opt,
                   device=torch.device("cpu"), dtype="fp32", grad_clip=1.0)  # fmt: skip
    return model, opt


def test_sharded_round_trip_equals_the_gathered_checkpoint(tmp_path):
    torch.set_num_threads(1)
    model, opt = _trained(2)
    (tmp_path / "g").mkdir()
    (tmp_path / "s").mkdir()
    gathered = save_checkpoint(tmp_path / "g", model, opt, {"step": 2})
    folder = save_checkpoint(tmp_path / "s", model, opt, {"step": 2}, sharded_files=True)
    state = read_state(folder)
    assert state["format"] == FORMAT_SHARDED and state["aliases"] == {
        "lm_head.weight": "embed.weight"
    }
    assert not (folder / "model.safetensors").exists() and sharded.shard_files(folder / "model")
    # The optimiser state, keyed by name, reads back whole and equals the gathered file's.
    ours, theirs = read_optimizer_state(gathered), read_optimizer_state(folder)
    assert (
        ours["param_groups"] == theirs["param_groups"]
        and ours["state"].keys() == theirs["state"].keys()
    )
    for p, per in ours["state"].items():
        assert all(torch.equal(v, theirs["state"][p][k]) for k, v in per.items()), p
    # Loaded into a model and optimiser built from another seed: the same state, the same next step.
    again, opt2 = _trained(0, seed=7)
    assert load_checkpoint(folder, again, opt2)["step"] == 2
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert again.lm_head.weight is again.embed.weight
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    for m, o in ((model, opt), (again, opt2)):
        train_step(lambda a, b, m=m: lm_loss(m(a), b), [(x[:, :-1], x[:, 1:])], o,
                   device=torch.device("cpu"), dtype="fp32", grad_clip=1.0)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_damaged_stray_and_misfit_sharded_checkpoints(tmp_path, capsys):
    torch.set_num_threads(1)
    model, opt = _trained(1)
    save_checkpoint(tmp_path, model, opt, {"step": 1}, sharded_files=True)
    save_checkpoint(tmp_path, model, opt, {"step": 2}, sharded_files=True)
    latest = tmp_path / "checkpoint"
    # A shard file not listed in state.json is refused (dcp's reader would read it too).
    stray = latest / "optimizer" / "extra.safetensors"
    stray.write_bytes((latest / "rng.safetensors").read_bytes())
    with pytest.raises(UserError, match="extra.safetensors is not one of its files"):
        read_state(latest)
    stray.unlink()
    # A truncated shard fails its checksum; the previous checkpoint is used, with a warning.
    shard = sharded.shard_files(latest / "model")[0]
    shard.write_bytes(shard.read_bytes()[:-8])
    assert usable_checkpoint(tmp_path) == tmp_path / ".checkpoint.old"
    assert "fails its sha256 check" in capsys.readouterr().err
    # Another shape: refused before anything loads, naming the tensor.
    arch = Architecture.parse("SEAF", shape="tiny")
    wide = build_model(arch.with_shape(dataclasses.replace(arch.shape, vocab_size=320)))
    with pytest.raises(UserError, match="embed.weight is .* in it"):
        load_checkpoint(tmp_path / ".checkpoint.old", wide)


ARGS = ["--shape", "tiny", "--tokens", "2048", "--batch-size", "4", "--seq-len", "32"]
ARGS += ["--grad-accum", "2", "--dtype", "fp32", "--log-every", "1", "--eval-every", "0"]
ARGS += ["--eval-tokens", "128", "--checkpoint-every", "2", "--no-progress", "--json"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _cmd(data, out, *extra: str) -> list[str]:
    return [*TORCHRUN, "-m", "hcomposer.cli", "train", "SEAF", "--data", str(data), *ARGS,
            "--fsdp", "--out", str(out), *extra]  # fmt: skip


@pytest.mark.slow
def test_fsdp_killed_after_a_sharded_checkpoint_resumes_to_the_same_end(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(embedded_corpus_text()[:40_000], encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HCOMPOSER_CACHE": str(tmp_path / "cache")}
    run = lambda cmd: subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # noqa: E731
    whole = run(_cmd(data, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    # The same run, killed (SIGKILL to torchrun and both ranks) once a checkpoint is written.
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(data, killed), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (killed / "checkpoint" / "state.json").is_file() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.02)
    # torchrun starts each rank in a session of its own, out of reach of a signal to its
    # group: kill torchrun and every process under it, and wait until all have exited (a live
    # rank would still hold the run folder's lock when the resume starts).
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, f"processes {[p.pid for p in alive]} outlived SIGKILL"
    assert read_json(killed / "status.json")["status"] == "running"
    step = read_state(usable_checkpoint(killed))["step"]
    assert 2 <= step < 16
    resumed = run(_cmd(data, killed, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    ours = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "whole" / "metrics.jsonl")}
    again = {r["step"]: r["loss"] for r in read_jsonl(killed / "metrics.jsonl")}
    assert list(ours) == list(range(1, 17)) and again == ours  # bit for bit, every step
    for name in ("whole", "killed"):
        assert read_json(tmp_path / name / "checkpoint" / "state.json")["world_size"] == 2
    # Read whole in one process (2 shards -> 1): the same weights and optimiser state.
    model_a, _, _, info = load_run(tmp_path / "whole")
    model_b, *_ = load_run(killed)
    assert info["step"] == 16
    for (k, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), k
    assert model_a.layers[1].mixer.expert_bias.abs().sum() > 0
    opt_a = read_optimizer_state(tmp_path / "whole" / "checkpoint")
    opt_b = read_optimizer_state(killed / "checkpoint")
    for p, per in opt_a["state"].items():
        assert all(torch.equal(v, opt_b["state"][p][k]) for k, v in per.items()), p
