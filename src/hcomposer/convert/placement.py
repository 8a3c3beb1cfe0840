"""Which attention layers to keep: placement strategies and their per-layer scores.

- ``even``: the ``k`` kept layers spread evenly over the depth (a baseline; no training).
- ``greedy`` (Distill-then-Replace, arXiv 2601.11667): every attention layer's converted twin
  is first distilled locally (its mixer alone, on the teacher's own input to that layer, to
  the teacher layer's output; a short run of the one trainer per layer); then layers are
  replaced one at a time, each time the one whose replacement gives the lowest validation
  loss, until ``k`` remain. Scores: each layer's validation-loss increase when it alone is
  replaced, and the order of replacement.
- ``optuna``: an Optuna study (TPE, SQLite in the folder, resumable) over keep-sets; a trial
  scores a keep-set by the validation loss after a short distillation of the whole student.
  Scores: per layer, mean loss of the trials that kept it minus that of the trials that did not.
- ``gates`` (FlashMorph-style, ``convert.gates``): a gate per layer between its attention and
  its converted twin, trained with a penalty toward the twin (on the text, plus MAD recall
  with ``--gate-recall-weight``); the ``k`` highest gates are kept.
  It trains for (attention layers) x the probe tokens: the budget of ``greedy``'s probes.
  Scores: the learned gates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from hcomposer.convert.mapping import convert_model, student_architecture
from hcomposer.model import HybridLM
from hcomposer.training.step import evaluate

__all__ = [
    "STRATEGIES",
    "even_keep",
    "LocalDistillation",
    "val_loss",
    "greedy_replacement",
]

STRATEGIES = ("even", "greedy", "optuna", "gates")


def even_keep(n: int, k: int) -> list[int]:
    """``k`` of ``n`` attention layers spread evenly (centres of ``k`` equal bins)."""
    return sorted({min(n - 1, int((j + 0.5) * n / k)) for j in range(k)}) if k else []


def val_loss(model: HybridLM, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean next-token loss of ``model`` over ``batches`` (the shared evaluation loop)."""
    device = next(model.parameters()).device
    result = evaluate(
        lambda x, y: (model(x), y), batches, device=device, dtype="fp32", modules=[model]
    )
    return result.loss


class LocalDistillation:
    """The trainer objective of one layer's local distillation (``greedy``'s first phase).

    The student is the teacher with sublayer ``index`` converted; everything but that mixer is
    frozen. Loss: mean squared error of the mixer's output to the teacher mixer's output on the
    teacher's own normed input to that sublayer, relative to the teacher output's mean square.
    """

    def __init__(self, teacher: HybridLM, initial: dict, index: int, info: dict[str, Any]):
        self.teacher, self.initial, self.index, self.info = teacher.eval(), initial, index, info

    def check(self, arch, tokenizer) -> None:
        """Nothing beyond the full distillation's checks, which the caller ran."""

    def prepare(self, model, device) -> None:
        model.load_state_dict(self.initial)
        model.requires_grad_(False)
        model.layers[self.index].mixer.requires_grad_(True)
        self.teacher.to(device)

    def loss(self, net, x, y) -> torch.Tensor:
        with torch.no_grad():
            h = self.teacher.embed(x)
            for block in self.teacher.layers[: self.index]:
                h = block(h)
            inp = self.teacher.layers[self.index].norm(h)
            want = self.teacher.layers[self.index].mixer(inp).float()
        got = net.layers[self.index].mixer(inp).float()
        return F.mse_loss(got, want) / want.pow(2).mean().clamp_min(1e-12)

    def record(self) -> dict[str, Any]:
        return {"kind": "local-distillation", "sublayer": self.index, **self.info}


def greedy_replacement(
    teacher: HybridLM,
    attn: list[int],
    twins: dict[int, torch.nn.Module],
    keep: int,
    score: Callable[[HybridLM], float],
    to: str,
) -> tuple[list[int], list[dict[str, Any]]]:
    """Replace attention layers one at a time (lowest validation loss first) until ``keep``
    remain. ``twins[i]`` is sublayer ``i``'s locally distilled mixer. Returns the kept
    attention ordinals and the steps taken (which layer, the loss after)."""
    converted: list[int] = []
    steps = []
    while len(attn) - len(converted) > keep:
        trial = {}
        for i in attn:
            if i in converted:
                continue
            trial[i] = score(_with_twins(teacher, converted + [i], twins, to))
        best = min(trial, key=trial.get)
        converted.append(best)
        steps.append({"replaced": best, "val_loss": trial[best], "candidates": trial})
    kept = [j for j, i in enumerate(attn) if i not in converted]
    return kept, steps


def _with_twins(teacher: HybridLM, converted: list[int], twins: dict, to: str) -> HybridLM:
    model, _ = convert_model(teacher, student_architecture(teacher.arch, sorted(converted), to))
    with torch.no_grad():
        for i in converted:
            model.layers[i].mixer.load_state_dict(twins[i].state_dict())
    return model.to(next(teacher.parameters()).device).eval()
