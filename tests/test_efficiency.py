"""The efficiency suite times the trainer's own training step (the training core's
``train_step``), with the trainer's optimiser, autocast and clipping settings."""

from __future__ import annotations

import pytest
import torch

from hcomposer.evaluation import efficiency
from hcomposer.evaluation.efficiency import EfficiencyConfig, run_efficiency
from hcomposer.evaluation.efficiency_compare import compare_efficiency
from hcomposer.model import build_model
from hcomposer.training import step as core
from hcomposer.training.step import param_groups
from hcomposer.training.trainer import TrainConfig

torch.set_num_threads(1)

CFG = EfficiencyConfig(contexts=[16], repeats=2, decode_steps=1, train_batch=1, device="cpu",
                       bandwidth_probe_mib=0)  # fmt: skip


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    """Every call of the training core's ``train_step``: (loss, optimizer, keywords)."""
    seen = []
    real = core.train_step

    def counting(loss_fn, micro_batches, optimizer, **kw):
        loss, norm = real(loss_fn, micro_batches, optimizer, **kw)
        seen.append((loss, optimizer, kw))
        return loss, norm

    monkeypatch.setattr(core, "train_step", counting)
    return seen


def _trainer_adamw(opt, model, train: TrainConfig) -> None:
    """``opt`` is the trainer's AdamW: its parameter groups, weight decay and betas."""
    assert isinstance(opt, torch.optim.AdamW)
    groups = param_groups(model, train.weight_decay)
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in groups]
    assert [g["weight_decay"] for g in opt.param_groups] == [train.weight_decay, 0.0]
    assert all(tuple(g["betas"]) == train.betas for g in opt.param_groups)


def test_run_efficiency_times_the_training_core_step_with_trainer_settings(calls):
    model = build_model("AF", shape="tiny", seed=0)
    train = TrainConfig(dtype="bf16", grad_clip=0.5, weight_decay=0.2, betas=(0.8, 0.9))
    res = run_efficiency(model, train_len=16, config=CFG, train=train)
    assert len(calls) == 1 + CFG.repeats  # one warm-up, then the timed steps
    loss, opt, kw = calls[0]
    assert kw == {"device": torch.device("cpu"), "dtype": "bf16", "grad_clip": 0.5}
    _trainer_adamw(opt, model, train)
    # The trainer's loss (next-token cross-entropy): near log(vocab) for a fresh model.
    assert loss == pytest.approx(
        torch.log(torch.tensor(model.arch.shape.vocab_size)).item(), rel=0.1
    )
    step = res["train"]
    assert (step["precision"], step["grad_clip"], step["optimizer"]) == ("bf16", 0.5, "adamw")
    assert "adamw, bf16, clip 0.5" in efficiency.efficiency_markdown(res)

    # Without settings: the trainer's defaults.
    calls.clear()
    run_efficiency(model, train_len=16, config=CFG)
    defaults = TrainConfig()
    assert calls and all(kw["dtype"] == defaults.dtype for _, _, kw in calls)
    assert calls[0][2]["grad_clip"] == defaults.grad_clip
    _trainer_adamw(calls[0][1], model, defaults)


def test_compare_efficiency_times_the_training_core_step_for_every_model(calls):
    models = {"base": build_model("AF", shape="tiny"), "hyb": build_model("SF", shape="tiny")}
    train = TrainConfig(dtype="fp32", grad_clip=2.0)
    cfg = EfficiencyConfig(contexts=[16], repeats=2, decode_steps=1, train_batch=1,
                           device="cpu", train_optimizer="none")  # fmt: skip
    res = compare_efficiency(models, train_len=16, config=cfg, train=train)
    # measure_interleaved: one warm-up round and ``repeats`` timed rounds of both models.
    assert len(calls) == 2 * (1 + cfg.repeats)
    assert all(opt is None and kw["dtype"] == "fp32" and kw["grad_clip"] == 2.0
               for _, opt, kw in calls)  # fmt: skip
    assert res["models"]["hyb"]["train"]["precision"] == "fp32"
    # The evaluated weights are never touched (each step trains a copy).
    fresh = build_model("AF", shape="tiny")
    assert all(torch.equal(a, b) for a, b in zip(models["base"].parameters(), fresh.parameters()))
