"""Learned gates between each attention layer and its converted twin (FlashMorph-style).

Every attention sublayer ``i`` becomes ``y = g_i * attention(x) + (1 - g_i) * twin(x)`` with one
scalar gate ``g_i = sigmoid(GATE_SCALE * theta_i)``, started at ``g = sigmoid(GATE_START)``
(close to the teacher). The super-network trains the twins and the gates (the attention and,
by default, everything else frozen) on the distillation objective plus ``penalty * mean(g)``,
which pushes every layer toward its linear branch: the layers whose gates stay high are those
whose attention the objective cannot do without, and the ``k`` highest are kept.

``GATE_SCALE`` gives the gate a larger effective step than the other weights under the one
learning rate (Adam moves ``theta`` by about ``lr`` per step, the logit by ``GATE_SCALE * lr``).

Differences from FlashMorph (arXiv 2606.30562), said plainly: the gates train on the text the
conversion distils on, not on synthetic long-context retrieval data, and the cut is a top-k of
the learned gates rather than a budgeted schedule.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from hcomposer.convert.distill import DistillConfig, distill_loss
from hcomposer.model import HybridLM

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
    ):
        self.teacher = teacher.eval()
        self.initial, self.layers, self.config = initial, layers, config
        self.penalty, self.info = penalty, info
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
        gates = torch.stack([m.gate for m in self.gated]).float()
        return main + self.penalty * gates.mean()

    def record(self) -> dict[str, Any]:
        return {
            "kind": "gated-super-network",
            **self.config.to_dict(),
            "penalty": self.penalty,
            "layers": self.layers,
            **self.info,
        }
