"""Distillation: the objective a converted student trains on, run by the one trainer.

    loss = kl_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + lm_weight * CE(student, next tokens)
         + hidden_weight * mean over sublayers of mean((h_student - h_teacher)^2)

KL and CE are means over token positions, computed in fp32; ``T^2`` keeps the KL term's
gradient scale independent of the temperature (Hinton et al. 2015). ``h`` is the residual
stream after each sublayer. The teacher's logits (and states) are computed on the fly, under
``no_grad``, on the same micro-batch. ``freeze_mlp`` keeps every F/E sublayer (its norm too) at
the teacher's weights: they get no gradient and no optimiser state.

``Distillation`` implements ``hcomposer.training.Objective``: ``hcomposer.training.train`` runs
it with the trainer's schedule, checkpoints and exact resume; validation stays the LM loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hcomposer.architecture import Architecture
from hcomposer.config_io import Config
from hcomposer.data import Tokenizer
from hcomposer.errors import UserError
from hcomposer.fields import spec
from hcomposer.model import HybridLM, lm_loss

__all__ = ["DistillConfig", "Distillation", "distill_loss", "residual_states"]


@dataclass(frozen=True, kw_only=True)
class DistillConfig(Config):
    """The distillation objective's weights. Frozen, keyword-only, JSON round trip."""

    _what: ClassVar[str] = "distill config"

    temperature: float = spec(2.0, gt=0, le=100.0, help="softmax temperature of the KL term")
    kl_weight: float = spec(1.0, ge=0, le=1e6, help="weight of T^2 KL(teacher || student)")
    lm_weight: float = spec(0.1, ge=0, le=1e6, help="weight of the next-token cross-entropy")
    hidden_weight: float = spec(0.0, ge=0, le=1e6, help="weight of the per-sublayer state MSE")
    freeze_mlp: bool = spec(False, help="keep F/E sublayers at the teacher's weights")


def residual_states(model: HybridLM, tokens: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Logits and the residual stream after every sublayer (the model's own blocks, in order)."""
    x = model.embed(tokens)
    states = []
    for block in model.layers:
        x = block(x)
        states.append(x)
    return model.lm_head(model.norm(x)), states


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    config: DistillConfig,
    student_states: list[torch.Tensor] | None = None,
    teacher_states: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The objective of the module docstring for one micro-batch (a scalar, fp32)."""
    T = config.temperature
    vocab = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, vocab) / T
    t = teacher_logits.float().reshape(-1, vocab) / T
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    loss = config.kl_weight * T * T * kl / s.shape[0]
    if config.lm_weight:
        loss = loss + config.lm_weight * lm_loss(student_logits, targets)
    if config.hidden_weight:
        if not student_states or len(student_states) != len(teacher_states or ()):
            raise ValueError("hidden_weight needs the states of every sublayer of both models")
        mse = [F.mse_loss(a.float(), b.float()) for a, b in zip(student_states, teacher_states)]
        loss = loss + config.hidden_weight * torch.stack(mse).mean()
    return loss


class Distillation:
    """The objective: a teacher, the student's starting weights and the loss weights.

    ``initial`` is the converted student's state dict (``mapping.convert_model``); ``info``
    (teacher, converted sublayers, target primitive) is recorded in run.json with the config;
    ``tokenizer``, the teacher's, must be the one the student trains with.
    """

    def __init__(
        self,
        teacher: HybridLM,
        initial: dict[str, torch.Tensor],
        config: DistillConfig,
        info: dict[str, Any],
        tokenizer: Tokenizer | None = None,
    ):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.initial = initial
        self.config = config
        self.info = info
        self.tokenizer = tokenizer

    def check(self, arch: Architecture, tokenizer: Tokenizer) -> None:
        t = self.teacher.arch.shape
        if arch.shape.vocab_size != t.vocab_size or tokenizer.vocab_size > t.vocab_size:
            raise UserError(
                f"vocabulary mismatch: the teacher has {t.vocab_size} token ids, the student's "
                f"tokenizer {tokenizer.name!r} {tokenizer.vocab_size}; use the teacher's tokenizer"
            )
        mine = self.tokenizer
        if mine is not None and mine.identity != tokenizer.identity:
            raise UserError(
                f"vocabulary mismatch: the student's tokenizer {tokenizer.name!r} is not the "
                f"teacher's ({mine.name!r}); use the teacher's tokenizer"
            )
        if len(arch.layers) != len(self.teacher.arch.layers):
            raise UserError(
                f"student {arch.pattern} and teacher {self.teacher.arch.pattern} differ in depth"
            )

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        model.load_state_dict(self.initial)
        self.teacher.to(device)
        if self.config.freeze_mlp:
            for block in model.layers:
                if not block.mixer.is_mixer:
                    block.requires_grad_(False)

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hidden = self.config.hidden_weight > 0
        with torch.no_grad():
            if hidden:
                t_logits, t_states = residual_states(self.teacher, x)
            else:
                t_logits, t_states = self.teacher(x), None
        if hidden:
            s_logits, s_states = residual_states(net, x)
        else:
            s_logits, s_states = net(x), None
        return distill_loss(s_logits, t_logits, y, self.config, s_states, t_states)

    def record(self) -> dict[str, Any]:
        return {"kind": "distillation", **self.config.to_dict(), **self.info}
