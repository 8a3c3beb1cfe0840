"""Learned gates between each attention layer and its converted twin (FlashMorph-style).

Every attention sublayer ``i`` becomes ``y = g_i * attention(x) + (1 - g_i) * twin(x)`` with one
scalar gate ``g_i = sigmoid(GATE_SCALE * theta_i)``, started at ``g = sigmoid(GATE_START)``
(close to the teacher). The super-network trains the twins and the gates (the attention and,
by default, everything else frozen) on the distillation objective plus ``penalty * mean(g)``,
which pushes every layer toward its linear branch: the layers whose gates stay high are those
whose attention the objective cannot do without, and the ``k`` highest are kept.

``GATE_SCALE`` gives the gate a larger effective step than the other weights under the one
learning rate (Adam moves ``theta`` by about ``lr`` per step, the logit by ``GATE_SCALE * lr``).

With ``recall_weight > 0`` (``--gate-recall-weight``) each step adds ``recall_weight`` x the
LM loss of the gated network on as many MAD in-context recall sequences as the text batch
holds (``convert.recall``: 16 tokens placed at ``--gate-recall-offset`` of the teacher's
vocabulary, loss only at the recalled values), as FlashMorph trains its gates on synthetic
retrieval. The default stays 0 (the text alone): on the known-answer study of 2026-12-07
(``benchmarks/results/convert_known_answer/``), with the recall carried by two attention layers,
weight 1 at the study's budget (16 gate steps, penalty 0.05) kept both on neither teacher, no
better than the text alone; the gates hardly leave their start there. Recall data can only help
where the recall tokens are ids the teacher learned to recall with.

Differences from FlashMorph (arXiv 2606.30562), said plainly: the recall data is MAD's short
in-context recall (32 tokens), not long-context retrieval, mixed with the distillation text;
and the cut is a top-k of the learned gates rather than a budgeted schedule.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from hcomposer.convert.distill import DistillConfig, distill_loss
from hcomposer.convert.recall import RecallData
from hcomposer.model import HybridLM, lm_loss

__all__ = ["GatedTwin", "GateSearch", "GATE_SCALE", "GATE_START", "gate_values"]

GATE_SCALE = 100.0
GATE_START = 3.0


class GatedTwin(nn.Module):
    """``g * attention(x) + (1 - g) * twin(x)``, ``g = sigmoid(GATE_SCALE * theta)``."""

    is_mixer = True

    def __init__(self, attention: nn.Module, twin: nn.Module):
        super().__init__()
        self.attention = attention
        self.twin = twin
        self.theta = nn.Parameter(torch.tensor(GATE_START / GATE_SCALE))

    @property
    def gate(self) -> torch.Tensor:
        return torch.sigmoid(GATE_SCALE * self.theta)

    def forward(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        g = self.gate.to(x.dtype)
        return g * self.attention(x) + (1 - g) * self.twin(x)

    def decode_block(self, x, norm, cache):
        return None


def gate_values(state: dict[str, torch.Tensor], layers: list[int]) -> dict[int, float]:
    """Each gated sublayer's ``g`` from a (checkpoint) state dict."""
    out = {}
    for i in layers:
        theta = state[f"layers.{i}.mixer.theta"].double()
        out[i] = float(torch.sigmoid(GATE_SCALE * theta))
    return out


class GateSearch:
    """The trainer objective of the gated super-network (see the module docstring).

    The model the trainer builds is the student with every attention sublayer in ``layers``
    converted; ``prepare`` loads ``initial`` (``mapping.convert_model``'s state) and wraps each
    converted mixer with a frozen copy of the teacher's attention in a :class:`GatedTwin`.
    """

    def __init__(
        self,
        teacher: HybridLM,
        initial: dict[str, torch.Tensor],
        layers: list[int],
        config: DistillConfig,
        penalty: float,
        info: dict[str, Any],
        recall: RecallData | None = None,
        recall_weight: float = 0.0,
    ):
        if recall_weight and recall is None:
            raise ValueError("recall_weight > 0 needs the recall data")
        self.teacher = teacher.eval()
        self.initial, self.layers, self.config = initial, layers, config
        self.penalty, self.info = penalty, info
        self.recall, self.recall_weight = recall, recall_weight
        self.gated: list[GatedTwin] = []

    def check(self, arch, tokenizer) -> None:
        """The conversion's own checks ran before; nothing more here."""

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        model.load_state_dict(self.initial)
        model.requires_grad_(False)
        self.gated = []
        for i in self.layers:
            attention = copy.deepcopy(self.teacher.layers[i].mixer).requires_grad_(False)
            twin = model.layers[i].mixer.requires_grad_(True)
            model.layers[i].mixer = GatedTwin(attention, twin).to(device)
            self.gated.append(model.layers[i].mixer)
        if not self.config.freeze_mlp:
            for block in model.layers:
                if not block.mixer.is_mixer:
                    block.requires_grad_(True)
        self.teacher.to(device)

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = self.teacher(x)
        main = distill_loss(net(x), t_logits, y, self.config)
        if self.recall_weight:
            rx, ry = self.recall.batch_for(x, x.shape[0])
            main = main + self.recall_weight * lm_loss(net(rx.to(x.device)), ry.to(x.device))
        gates = torch.stack([m.gate for m in self.gated]).float()
        return main + self.penalty * gates.mean()

    def record(self) -> dict[str, Any]:
        return {
            "kind": "gated-super-network",
            **self.config.to_dict(),
            "penalty": self.penalty,
            "recall_weight": self.recall_weight,
            **({"recall_offset": self.recall.offset} if self.recall_weight else {}),
            "layers": self.layers,
            **self.info,
        }
