"""Learned gates between attention and its converted twin: the gate's known answers and
gradient, a kill-and-resume of the gated super-network equal to an uninterrupted run, and the
``gates`` strategy keeping the k highest gates."""

from __future__ import annotations

import torch

from hcomposer.cli import main
from hcomposer.convert import load_teacher
from hcomposer.convert.distill import DistillConfig
from hcomposer.convert.gates import GATE_SCALE, GatedTwin, GateSearch, gate_values
from hcomposer.convert.mapping import convert_model, student_architecture
from hcomposer.io import read_json, read_jsonl
from hcomposer.model import build_model
from hcomposer.training import TrainConfig, train
from hcomposer.training.checkpoint import find_checkpoint, load_checkpoint


def test_gate_mixes_attention_and_twin_and_its_gradient():
    torch.manual_seed(0)
    attention, twin = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    gated = GatedTwin(attention, twin)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    gated.double()
    a, t = attention(x), twin(x)
    for logit, want in ((40.0, a), (-40.0, t)):
        with torch.no_grad():
            gated.theta.fill_(logit / GATE_SCALE)
        torch.testing.assert_close(gated(x), want)
    with torch.no_grad():
        gated.theta.fill_(0.3 / GATE_SCALE)
    g = torch.sigmoid(torch.tensor(0.3, dtype=torch.float64))
    out = gated(x)
    torch.testing.assert_close(out, g * a + (1 - g) * t)
    out.sum().backward()
    want = GATE_SCALE * g * (1 - g) * (a - t).sum()
    torch.testing.assert_close(gated.theta.grad, want.detach())


def _gate_search(run):
    teacher = load_teacher(run)
    attn = teacher.attention_layers
    arch = student_architecture(teacher.arch, attn, "D")
    student, _ = convert_model(teacher.model, arch, seed=0)
    objective = GateSearch(teacher.model, student.state_dict(), attn, DistillConfig(), 0.1, {})
    return objective, arch, attn


def test_gated_super_network_resumes_exactly(small_teacher, convert_text, tmp_path):
    config = TrainConfig(
        tokens=6 * 4 * 32, batch_size=4, seq_len=32, lr=1e-3, min_lr=1e-4, warmup=2,
        dtype="fp32", eval_every=0, eval_tokens=256, log_every=1, checkpoint_every=0,
        data=str(convert_text), threads=1,
    )  # fmt: skip
    objective, arch, attn = _gate_search(small_teacher)
    train(arch, config, tmp_path / "full", progress=False, objective=objective)
    objective, arch, _ = _gate_search(small_teacher)
    train(arch, config, tmp_path / "part", progress=False, objective=objective, stop_at=3)
    objective, arch, _ = _gate_search(small_teacher)
    train(arch, config, tmp_path / "part", progress=False, objective=objective, resume=True)
    losses = [
        [r["loss"] for r in read_jsonl(tmp_path / d / "metrics.jsonl")] for d in ("full", "part")
    ]
    assert losses[0] == losses[1]
    gates = []
    for d in ("full", "part"):
        model = build_model(arch)
        objective.prepare(model, "cpu")
        load_checkpoint(find_checkpoint(tmp_path / d), model, restore_rng=False)
        gates.append(gate_values(model.state_dict(), attn))
    assert gates[0] == gates[1]
    # The penalty and the objective moved the gates from their start (sigmoid(3)).
    assert all(abs(g - 0.9526) > 1e-3 for g in gates[0].values())


def test_gates_strategy_keeps_the_highest_gates(small_teacher, convert_text, tmp_path):
    out = tmp_path / "gates"
    argv = ["convert", str(small_teacher), "--keep", "2", "--to", "S", "--out", str(out)]
    argv += ["--strategy", "gates", "--probe-tokens", "512", "--tokens", "256"]
    argv += ["--data", str(convert_text), "--seq-len", "32", "--batch-size", "4"]
    argv += ["--eval-tokens", "1K", "--no-progress"]
    assert main(argv) == 0
    placement = read_json(out / "placement.json")
    scores = {int(k): v for k, v in placement["scores"].items()}
    assert set(scores) == {0, 1, 2} and all(0 < v < 1 for v in scores.values())
    lowest = min(scores, key=scores.get)
    assert placement["keep"] == sorted(set(scores) - {lowest})
