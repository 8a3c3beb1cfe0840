"""The training objective a run may use instead of the plain LM loss (distillation, for one)."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from hcomposer.architecture import Architecture

__all__ = ["Objective"]


class Objective(Protocol):
    """What a training run minimises, when not the plain LM loss (distillation, for one).

    The trainer calls ``check(arch, tokenizer)`` before anything is written (a UserError
    refuses the run), ``prepare(model, device)`` on the freshly built model before the
    optimiser is made (load starting weights, freeze parameters: frozen ones get no optimiser
    state), and ``loss(net, x, y)`` on every micro-batch under the step's autocast.
    ``record()`` goes into run.json and must be equal when the run is resumed.
    """

    def check(self, arch: Architecture, tokenizer: Any) -> None: ...

    def prepare(self, model: torch.nn.Module, device: torch.device) -> None: ...

    def loss(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def record(self) -> dict[str, Any]: ...
