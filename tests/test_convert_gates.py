"""Learned gates between attention and its converted twin: the gate's known answers and
gradient, a kill-and-resume of the gated super-network equal to an uninterrupted run, and the
``gates`` strategy keeping the k highest gates."""

from __future__ import annotations

import json

import torch

from hcomposer.cli import main
from hcomposer.convert import load_teacher
from hcomposer.convert.distill import DistillConfig, distill_loss
from hcomposer.convert.gates import GATE_SCALE, GatedTwin, GateSearch, gate_values
from hcomposer.convert.mapping import convert_model, student_architecture
from hcomposer.convert.recall import RecallData
from hcomposer.io import read_json, read_jsonl
from hcomposer.model import build_model, lm_loss
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


def test_recall_trained_gate_objective_is_the_hand_sum(small_teacher):
    teacher = load_teacher(small_teacher)
    attn = teacher.attention_layers
    arch = student_architecture(teacher.arch, attn, "D")
    student, _ = convert_model(teacher.model, arch, seed=0)
    recall = RecallData(0, 260, teacher.arch.shape.vocab_size)
    config = DistillConfig()
    args = (teacher.model, student.state_dict(), attn, config, 0.1, {})
    objective = GateSearch(*args, recall=recall, recall_weight=0.7)
    text_only = GateSearch(*args)
    net = build_model(arch)
    objective.prepare(net, "cpu")
    with torch.no_grad():
        for j, m in enumerate(objective.gated):
            m.theta.fill_((1.0 - j) / GATE_SCALE)
    tokens = torch.randint(0, 256, (3, 33), generator=torch.Generator().manual_seed(5))
    x, y = tokens[:, :-1], tokens[:, 1:]
    got = objective.loss(net, x, y)
    rx, ry = recall.batch_for(x, 3)
    assert rx.shape == (3, 32) and int(rx.min()) >= 260 and int(ry.max()) >= 260
    gates = torch.sigmoid(torch.tensor([1.0 - j for j in range(len(attn))])).mean()
    with torch.no_grad():
        text = distill_loss(net(x), teacher.model(x), y, config)
    want = text + 0.7 * lm_loss(net(rx), ry) + 0.1 * gates
    torch.testing.assert_close(got, want)
    # The recall term is there (the text-only objective lacks it) and the same text batch
    # draws the same recall batch (a resumed run draws what an uninterrupted one does).
    text_only.gated = objective.gated
    assert float(got - text_only.loss(net, x, y)) > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(recall.batch_for(x, 3), (rx, ry)))
    assert objective.record()["recall_weight"] == 0.7
    assert objective.record()["recall_offset"] == 260


def _gates_argv(teacher, text, out) -> list[str]:
    argv = ["convert", str(teacher), "--keep", "2", "--to", "S", "--out", str(out)]
    argv += ["--strategy", "gates", "--probe-tokens", "256", "--tokens", "128"]
    argv += ["--data", str(text), "--seq-len", "32", "--batch-size", "4"]
    return argv + ["--eval-tokens", "256", "--no-progress"]


def test_gate_recall_option_reaches_the_gate_search(small_teacher, convert_text, tmp_path, capsys):
    out = tmp_path / "gates"
    argv = _gates_argv(small_teacher, convert_text, out)
    assert main(argv + ["--gate-recall-weight", "0.5", "--gate-recall-offset", "260"]) == 0
    run = read_json(out / "placement" / "gates" / "run.json")
    found = json.dumps(run)
    assert '"recall_weight": 0.5' in found and '"recall_offset": 260' in found
    assert "recall weight 0.5" in read_json(out / "placement.json")["score_meaning"]
    assert read_json(out / "convert.json")["gate_recall_weight"] == 0.5
    # Recall tokens past the vocabulary (320 ids), or the option without the gates: exit 2,
    # one line, nothing written.
    capsys.readouterr()
    for extra in (["--gate-recall-weight", "1", "--gate-recall-offset", "310"],
                  ["--gate-recall-weight", "1", "--strategy", "even"]):  # fmt: skip
        bad = tmp_path / "bad"
        assert main(_gates_argv(small_teacher, convert_text, bad) + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "recall" in err, err
        assert not bad.exists()
