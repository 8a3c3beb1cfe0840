"""Learning-rate schedules as pure functions of the step (nothing to save, exact on resume).

- ``cosine``: linear warmup from 0 to ``lr`` over ``warmup`` steps, then a half cosine from
  ``lr`` down to ``min_lr`` at the last step.
- ``wsd`` (warmup-stable-decay, Hu et al. 2024 "MiniCPM"): linear warmup, constant ``lr``,
  then a linear decay to ``min_lr`` over the last ``decay_fraction`` of the steps.
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "lr_at", "warmup_steps"]

SCHEDULES = ("cosine", "wsd")


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` below 1 is a fraction of the steps, otherwise a number of steps."""
    n = round(warmup * total_steps) if warmup < 1 else int(warmup)
    return max(0, min(n, total_steps))


def lr_at(
    step: int,
    *,
    total_steps: int,
    lr: float,
    min_lr: float,
    warmup: float,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    n_warm = warmup_steps(warmup, total_steps)
    if step < n_warm:
        return lr * (step + 1) / n_warm
    last = max(total_steps - 1, 1)
    if schedule == "cosine":
        span = max(last - n_warm, 1)
        progress = min(max(step - n_warm, 0) / span, 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    n_decay = max(1, round(decay_fraction * total_steps))
    decay_start = max(n_warm, total_steps - n_decay)
    if step < decay_start:
        return lr
    progress = min((step - decay_start + 1) / max(total_steps - decay_start, 1), 1.0)
    return lr + (min_lr - lr) * progress
