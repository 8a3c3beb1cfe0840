"""The inner loop of the synthetic proxies: train a fresh model on one task, score it.

One call of :func:`train_and_score` trains one model for a fixed number of AdamW
steps on one task's generated training set at one learning rate and weight decay,
then measures accuracy and loss on the held-out set. Everything is batched
tensors; the only Python loop is over optimiser steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from hcomposer.architecture import Architecture
from hcomposer.data.mad import IGNORE, MADData
from hcomposer.model import HybridLM, build_model, lm_loss
from hcomposer.primitives import RMSNorm
from hcomposer.training.schedule import lr_at
from hcomposer.training.step import evaluate, make_optimizer, set_lr, train_step

__all__ = [
    "RunResult",
    "PooledDecoder",
    "train_and_score",
    "evaluate_split",
    "build_task_model",
    "count_params",
    "proxy_lr",
]


@dataclass
class RunResult:
    """One training run (one task, one lr, one weight decay)."""

    lr: float
    weight_decay: float
    accuracy: float
    loss: float
    steps_done: int
    tokens: int
    seconds: float
    failure: str | None = None
    # accuracy on the validation split (what selection uses; nan when not measured)
    val_accuracy: float = float("nan")
    # (step, validation accuracy) at every check during training
    curve: list[tuple[int, float]] = field(default_factory=list)
    # 0 for a grid point's first run; k for its k-th restart after a stall
    restart: int = 0

    def to_dict(self) -> dict:
        return {
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "accuracy": self.accuracy,
            "val_accuracy": _finite_or_none(self.val_accuracy),
            "curve": [[s, round(a, 4)] for s, a in self.curve],
            "loss": _finite_or_none(self.loss),
            "steps": self.steps_done,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "failure": self.failure,
            "restart": self.restart,
        }


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class PooledDecoder(nn.Module):
    """Rebuild a whole sequence from one vector (MAD's compression task).

    The last position's final hidden state is the code; each output position adds a
    fixed sinusoidal position vector to it and a small two-layer MLP with its own
    unembedding predicts the token there. The decoder cannot see the input, so all
    the information must pass through the architecture's last position.
    """

    def __init__(self, d_model: int, vocab_size: int, seq_len: int):
        super().__init__()
        pos = torch.arange(seq_len, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2) / d_model)
        table = torch.zeros(seq_len, d_model)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
        self.register_buffer("positions", table, persistent=False)
        self.mlp = nn.Sequential(
            RMSNorm(d_model),
            nn.Linear(d_model, d_model),
            nn.GELU(),
            RMSNorm(d_model),
            nn.Linear(d_model, d_model),
            nn.GELU(),
            RMSNorm(d_model),
        )
        self.unembed = nn.Linear(d_model, vocab_size)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        """code [B, D] -> logits [B, T, V]."""
        x = code[:, None, :] + self.positions.to(code.dtype)
        return self.unembed(self.mlp(x))


def proxy_lr(step: int, total: int, peak: float, warmup: int, schedule: str = "cosine") -> float:
    """The proxies' schedule: the trainer's ``cosine`` or ``wsd`` (warmup, constant, linear
    decay over the last fifth), decaying to a tenth of the peak."""
    return lr_at(
        step, total_steps=total, lr=peak, min_lr=0.1 * peak, warmup=warmup, schedule=schedule
    )


def _logits_at_targets(model: HybridLM, head: PooledDecoder | None, x, y):
    """Logits [K, V] and labels [K] at the scored positions only."""
    h = model.hidden_states(x)
    if head is not None:
        logits = head(h[:, -1])
        mask = y != IGNORE
        return logits[mask], y[mask]
    mask = y != IGNORE
    # The output head runs only where a target is scored (a quarter of the
    # positions on recall): cheaper, and the same loss.
    return model.lm_head(h[mask]), y[mask]


def build_task_model(
    arch: Architecture, data: MADData, seed: int, device: torch.device | str = "cpu"
) -> tuple[HybridLM, PooledDecoder | None]:
    """A fresh model (and decoder for pooled tasks) sized for the task, seeded,
    without touching the caller's global random state."""
    vocab = data.config.vocab_size
    seq_len = data.train_inputs.shape[1]
    shape = arch.shape.replace(vocab_size=vocab, max_seq_len=max(seq_len, 2))
    with torch.random.fork_rng(devices=[]):
        model = build_model(arch.with_shape(shape), seed=seed)
        head = None
        if data.pooled:
            torch.manual_seed(seed + 1)
            head = PooledDecoder(shape.d_model, vocab, seq_len)
    # Built on the CPU from the CPU generator, then moved: the same weights on every device.
    return model.to(device), (head.to(device) if head is not None else None)


def evaluate_split(
    model: HybridLM,
    head: PooledDecoder | None,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    dtype: str,
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy over the scored positions of a split."""
    device = next(model.parameters()).device
    batches = ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size))
    result = evaluate(
        lambda xb, yb: _logits_at_targets(model, head, xb, yb),
        batches,
        device=device,
        dtype=dtype,
        modules=[model] + ([head] if head is not None else []),
    )
    return result.accuracy, result.loss


def train_and_score(
    arch: Architecture,
    data: MADData,
    *,
    lr: float,
    weight_decay: float,
    steps: int,
    batch_size: int,
    warmup_steps: int,
    grad_clip: float,
    dtype: str,
    seed: int,
    eval_batch_size: int = 256,
    on_step: Callable[[int, int], None] | None = None,
    check_every: int = 0,
    on_check: Callable[[int, float], bool] | None = None,
    device: torch.device | str = "cpu",
    schedule: str = "cosine",
) -> RunResult:
    """Train a fresh model on ``data`` for ``steps`` AdamW steps, then score it.

    ``on_step(steps, tokens)`` is called after every step (for progress bars); a run
    stopped by a non-finite loss reports its remaining steps at once. Every
    ``check_every`` steps (0: never) the validation accuracy is measured, recorded in
    the result's ``curve`` and passed to ``on_check(step, accuracy)``; when that returns
    True training stops there (early stopping) and the run is scored as it stands.
    The result's ``accuracy`` and ``loss`` are on the test split, ``val_accuracy`` on
    the validation split (the test split when the data has none).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    model, head = build_task_model(arch, data, seed, device)
    modules: list[nn.Module] = [model] + ([head] if head is not None else [])
    opt = make_optimizer(
        modules, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98), device=device
    )
    x_tr = torch.from_numpy(data.train_inputs).to(device)
    y_tr = torch.from_numpy(data.train_targets).to(device)
    n = x_tr.shape[0]
    bs = min(batch_size, n)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    cursor = 0
    tokens = 0
    failure = None
    done = 0
    x_va, y_va = (torch.from_numpy(a) for a in data.val_split())
    curve: list[tuple[int, float]] = []
    for step in range(steps):
        if cursor + bs > n:  # next epoch, new order
            order = torch.randperm(n, generator=gen)
            cursor = 0
        idx = order[cursor : cursor + bs].to(device)
        cursor += bs
        set_lr(opt, proxy_lr(step, steps, lr, warmup_steps, schedule))
        loss, _ = train_step(
            lambda x, y: lm_loss(*_logits_at_targets(model, head, x, y)),
            [(x_tr[idx], y_tr[idx])],
            opt,
            device=device,
            dtype=dtype,
            grad_clip=grad_clip,
        )
        if not math.isfinite(loss):
            failure = f"non-finite training loss at step {step} (lr={lr:g}, wd={weight_decay:g})"
            break
        tokens += int(idx.numel() * x_tr.shape[1])
        done = step + 1
        if on_step is not None:
            on_step(1, int(idx.numel() * x_tr.shape[1]))
        if check_every and done % check_every == 0 and done < steps:
            acc_va, _ = evaluate_split(model, head, x_va, y_va, eval_batch_size, dtype)
            curve.append((done, acc_va))
            if on_check is not None and on_check(done, acc_va):
                if on_step is not None:
                    on_step(steps - done, 0)
                break
    if failure is not None:
        if on_step is not None:
            on_step(steps - done, 0)
        return RunResult(
            lr, weight_decay, 0.0, float("nan"), done, tokens, time.perf_counter() - t0, failure
        )
    val_acc, _ = evaluate_split(model, head, x_va, y_va, eval_batch_size, dtype)
    if check_every and (not curve or curve[-1][0] != done):
        curve.append((done, val_acc))
    acc, loss_v = evaluate_split(
        model,
        head,
        torch.from_numpy(data.test_inputs),
        torch.from_numpy(data.test_targets),
        eval_batch_size,
        dtype,
    )
    if not math.isfinite(loss_v):
        return RunResult(
            lr,
            weight_decay,
            0.0,
            float("nan"),
            done,
            tokens,
            time.perf_counter() - t0,
            f"non-finite held-out loss (lr={lr:g}, wd={weight_decay:g})",
        )
    return RunResult(
        lr,
        weight_decay,
        acc,
        loss_v,
        done,
        tokens,
        time.perf_counter() - t0,
        val_accuracy=val_acc,
        curve=curve,
    )


def count_params(arch: Architecture, data: MADData) -> int:
    """Parameters of the model as trained for this task (meta device, nothing allocated)."""
    shape = arch.shape.replace(
        vocab_size=data.config.vocab_size, max_seq_len=max(data.train_inputs.shape[1], 2)
    )
    model = build_model(arch.with_shape(shape), device="meta")
    return int(sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()))
