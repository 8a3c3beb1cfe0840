"""Distillation on the one trainer: the objective against a hand-computed reference (value and
gradient), frozen MLPs, a kill-and-resume equal to an uninterrupted run, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from hcomposer.convert import load_teacher
from hcomposer.convert.distill import Distillation, DistillConfig, distill_loss
from hcomposer.convert.mapping import convert_model, student_architecture
from hcomposer.data import ByteTokenizer, embedded_corpus_text
from hcomposer.errors import UserError
from hcomposer.io import read_jsonl
from hcomposer.training import TrainConfig, train
from hcomposer.training.checkpoint import find_checkpoint


def test_objective_value_and_gradient_match_hand_computation():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 3), generator=g)
    hs = [torch.randn(2, 3, 4, generator=g, requires_grad=True) for _ in range(2)]
    ht = [torch.randn(2, 3, 4, generator=g) for _ in range(2)]
    cfg = DistillConfig(temperature=1.7, kl_weight=0.8, lm_weight=0.3, hidden_weight=0.5)
    got = distill_loss(s, t, y, cfg, hs, ht)
    got.backward()

    # By hand, position by position, in plain Python floats.
    T, n = 1.7, 6
    kl = ce = 0.0
    grad = torch.zeros(2, 3, 5, dtype=torch.float64)
    for b in range(2):
        for i in range(3):
            sv, tv = s[b, i].tolist(), t[b, i].tolist()
            zs = sum(math.exp(v / T) for v in sv)
            zt = sum(math.exp(v / T) for v in tv)
            ps = [math.exp(v / T) / zs for v in sv]
            pt = [math.exp(v / T) / zt for v in tv]
            kl += sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps))
            z1 = sum(math.exp(v) for v in sv)
            p1 = [math.exp(v) / z1 for v in sv]
            ce += -math.log(p1[int(y[b, i])])
            for v in range(5):
                onehot = 1.0 if v == int(y[b, i]) else 0.0
                grad[b, i, v] = 0.8 * T * (ps[v] - pt[v]) / n + 0.3 * (p1[v] - onehot) / n
    mse = sum(float(((a.detach() - c) ** 2).mean()) for a, c in zip(hs, ht)) / 2
    want = 0.8 * T * T * kl / n + 0.3 * ce / n + 0.5 * mse
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)
    # distill_loss works in fp32 (as the trainer does): agreement to fp32 rounding.
    torch.testing.assert_close(s.grad, grad, rtol=1e-5, atol=1e-7)
    for a, c in zip(hs, ht):
        torch.testing.assert_close(a.grad, 0.5 * 2 * (a - c).detach() / a.numel() / 2)


def test_temperature_one_kl_only_is_zero_for_the_teacher_itself():
    t = torch.randn(1, 4, 7)
    cfg = DistillConfig(temperature=1.0, kl_weight=1.0, lm_weight=0.0)
    assert float(distill_loss(t.clone(), t, torch.zeros(1, 4, dtype=torch.long), cfg)) == (
        pytest.approx(0.0, abs=1e-6)
    )


@pytest.fixture
def text_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HCOMPOSER_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "text.txt"
    path.write_text(embedded_corpus_text()[200_000:260_000], encoding="utf-8")
    return path


def _objective(run, cfg: DistillConfig) -> tuple[Distillation, object]:
    teacher = load_teacher(run)
    arch = student_architecture(teacher.arch, [2], "S")
    calib = torch.tensor(ByteTokenizer().encode(embedded_corpus_text()[300_000:302_048]))
    student, _ = convert_model(teacher.model, arch, calib_tokens=calib.view(16, 128), seed=0)
    info = {"teacher": str(run), "convert": [2], "to": "S"}
    objective = Distillation(teacher.model, student.state_dict(), cfg, info, teacher.tokenizer)
    return objective, arch


def _config(text_file, **kw) -> TrainConfig:
    base = dict(
        tokens=6 * 4 * 32, batch_size=4, seq_len=32, lr=1e-3, min_lr=1e-4, warmup=2,
        dtype="fp32", eval_every=3, eval_tokens=256, log_every=1, checkpoint_every=0,
        data=str(text_file), threads=1,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(find_checkpoint(run_dir) / "model.safetensors"))


def test_kill_and_resume_equals_uninterrupted(small_teacher, text_file, tmp_path):
    cfg = DistillConfig(temperature=2.0, lm_weight=0.2, hidden_weight=0.5, freeze_mlp=True)
    objective, arch = _objective(small_teacher, cfg)
    config = _config(text_file)
    full = train(arch, config, tmp_path / "full", progress=False, objective=objective)
    assert full.status == "completed" and full.step == 6

    objective, arch = _objective(small_teacher, cfg)
    part = train(arch, config, tmp_path / "part", progress=False, objective=objective, stop_at=3)
    assert part.status == "running"
    objective, arch = _objective(small_teacher, cfg)
    done = train(arch, config, tmp_path / "part", progress=False, objective=objective, resume=True)
    assert done.status == "completed"
    a = [r["loss"] for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    b = [r["loss"] for r in read_jsonl(tmp_path / "part" / "metrics.jsonl")]
    assert a == b and len(a) == 6
    wa, wb = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0)
    # Frozen MLPs (and their norms) are still the teacher's; the converted mixer moved.
    teacher = load_teacher(small_teacher).model.state_dict()
    for name in ("layers.1.mixer.ffn.up_proj.weight", "layers.5.norm.weight"):
        torch.testing.assert_close(wa[name], teacher[name], rtol=0, atol=0)
    initial = objective.initial["layers.2.mixer.in_proj.weight"]
    assert not torch.equal(wa["layers.2.mixer.in_proj.weight"], initial)


def test_resume_with_another_objective_is_refused(small_teacher, text_file, tmp_path):
    objective, arch = _objective(small_teacher, DistillConfig())
    train(
        arch, _config(text_file), tmp_path / "run", progress=False, objective=objective, stop_at=2
    )
    other, arch = _objective(small_teacher, DistillConfig(temperature=4.0))
    with pytest.raises(UserError, match="another objective"):
        train(
            arch, _config(text_file), tmp_path / "run", progress=False, objective=other, resume=True
        )


def test_vocabulary_mismatch_is_refused_before_anything_is_written(
    small_teacher, text_file, tmp_path
):
    objective, arch = _objective(small_teacher, DistillConfig())
    config = _config(text_file, tokenizer="bpe:300")
    with pytest.raises(UserError, match="vocabulary mismatch"):
        train(arch, config, tmp_path / "run", progress=False, objective=objective)
    assert not (tmp_path / "run").exists()
