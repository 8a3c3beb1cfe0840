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
    "TaskRun",
    "TaskHooks",
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


@dataclass(frozen=True, kw_only=True)
class TaskRun:
    """How one model is trained on one task: one grid point of a proxy's search."""

    lr: float
    weight_decay: float
    steps: int
    batch_size: int
    warmup_steps: int
    grad_clip: float
    dtype: str
    seed: int
    eval_batch_size: int = 256
    # Every check_every steps (0: never) the validation accuracy is measured.
    check_every: int = 0
    schedule: str = "cosine"


@dataclass
class TaskHooks:
    """``on_step(steps, tokens)`` after every step (progress bars); ``on_check(step,
    validation accuracy) -> stop?`` at every check (early stopping)."""

    on_step: Callable[[int, int], None] | None = None
    on_check: Callable[[int, float], bool] | None = None

    def advance(self, steps: int, tokens: int) -> None:
        if self.on_step is not None and steps > 0:
            self.on_step(steps, tokens)


@dataclass
class _Progress:
    done: int = 0
    tokens: int = 0
    failure: str | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)


def train_and_score(
    arch: Architecture,
    data: MADData,
    run: TaskRun,
    *,
    hooks: TaskHooks | None = None,
    device: torch.device | str = "cpu",
) -> RunResult:
    """Train a fresh model on ``data`` for ``run.steps`` AdamW steps, then score it.

    A run stopped by a non-finite loss reports its remaining steps to ``hooks.on_step`` at
    once. Every ``run.check_every`` steps the validation accuracy is measured, recorded in
    the result's ``curve`` and passed to ``hooks.on_check``; when that returns True
    training stops there (early stopping) and the run is scored as it stands. The result's
    ``accuracy`` and ``loss`` are on the test split, ``val_accuracy`` on the validation
    split (the test split when the data has none).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    hooks = hooks or TaskHooks()
    model, head = build_task_model(arch, data, run.seed, device)
    modules: list[nn.Module] = [model] + ([head] if head is not None else [])
    opt = make_optimizer(
        modules, lr=run.lr, weight_decay=run.weight_decay, betas=(0.9, 0.98), device=device
    )
    x_va, y_va = (torch.from_numpy(a) for a in data.val_split())
    prog = _fit(model, head, opt, data, run, hooks, device, (x_va, y_va))

    def result(acc: float, loss: float, failure: str | None, **extra) -> RunResult:
        return RunResult(run.lr, run.weight_decay, acc, loss, prog.done, prog.tokens,
                         time.perf_counter() - t0, failure, **extra)  # fmt: skip

    if prog.failure is not None:
        hooks.advance(run.steps - prog.done, 0)
        return result(0.0, float("nan"), prog.failure)
    val_acc, _ = evaluate_split(model, head, x_va, y_va, run.eval_batch_size, run.dtype)
    if run.check_every and (not prog.curve or prog.curve[-1][0] != prog.done):
        prog.curve.append((prog.done, val_acc))
    x_te, y_te = torch.from_numpy(data.test_inputs), torch.from_numpy(data.test_targets)
    acc, loss_v = evaluate_split(model, head, x_te, y_te, run.eval_batch_size, run.dtype)
    if not math.isfinite(loss_v):
        where = f"(lr={run.lr:g}, wd={run.weight_decay:g})"
        return result(0.0, float("nan"), f"non-finite held-out loss {where}")
    return result(acc, loss_v, None, val_accuracy=val_acc, curve=prog.curve)


def _fit(model, head, opt, data: MADData, run: TaskRun, hooks: TaskHooks, device,
         val) -> _Progress:  # fmt: skip
    """The training loop: shuffled epochs of the training split, checks on ``val``."""
    x_tr = torch.from_numpy(data.train_inputs).to(device)
    y_tr = torch.from_numpy(data.train_targets).to(device)
    n = x_tr.shape[0]
    bs = min(run.batch_size, n)
    gen = torch.Generator().manual_seed(run.seed)
    order = torch.randperm(n, generator=gen)
    cursor = 0
    prog = _Progress()
    for step in range(run.steps):
        if cursor + bs > n:  # next epoch, new order
            order = torch.randperm(n, generator=gen)
            cursor = 0
        idx = order[cursor : cursor + bs].to(device)
        cursor += bs
        set_lr(opt, proxy_lr(step, run.steps, run.lr, run.warmup_steps, run.schedule))
        loss, _ = train_step(
            lambda x, y: lm_loss(*_logits_at_targets(model, head, x, y)),
            [(x_tr[idx], y_tr[idx])], opt, device=device, dtype=run.dtype,
            grad_clip=run.grad_clip,
        )  # fmt: skip
        if not math.isfinite(loss):
            where = f"(lr={run.lr:g}, wd={run.weight_decay:g})"
            prog.failure = f"non-finite training loss at step {step} {where}"
            return prog
        n_tok = int(idx.numel() * x_tr.shape[1])
        prog.tokens += n_tok
        prog.done = step + 1
        hooks.advance(1, n_tok)
        if run.check_every and prog.done % run.check_every == 0 and prog.done < run.steps:
            acc_va, _ = evaluate_split(model, head, *val, run.eval_batch_size, run.dtype)
            prog.curve.append((prog.done, acc_va))
            if hooks.on_check is not None and hooks.on_check(prog.done, acc_va):
                hooks.advance(run.steps - prog.done, 0)
                return prog
    return prog


def count_params(arch: Architecture, data: MADData) -> int:
    """Parameters of the model as trained for this task (meta device, nothing allocated)."""
    shape = arch.shape.replace(
        vocab_size=data.config.vocab_size, max_seq_len=max(data.train_inputs.shape[1], 2)
    )
    model = build_model(arch.with_shape(shape), device="meta")
    return int(sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()))
