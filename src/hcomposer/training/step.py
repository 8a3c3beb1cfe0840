"""One optimiser step and one evaluation loop, with the policies every trainer shares.

The trainer, the synthetic proxies, the text proxy and the efficiency suite all call these, so a
policy is written once:

- Weight decay applies to matrices only (Linear and conv weights); norms, biases, SSM scalars
  (A, D, dt) and embeddings (tied or not) are not decayed.
- Autocast: ``dtype="auto"`` is bf16 where the device has native bf16, else fp32;
  ``dtype="bf16"`` autocasts to bfloat16 on the model's device type (CPU or CUDA);
  ``"fp32"`` runs plain fp32. Losses are always computed in fp32.
- A step whose (averaged, all-reduced) loss is not finite updates nothing and reports the loss;
  the caller decides to stop. ``grad_clip <= 0`` means no clipping.
- ``batch_threads`` N > 1 splits every micro-batch into N row slices whose forward and backward
  run concurrently in N Python threads (torch releases the GIL inside its ops, and on CPU the
  autograd engine runs a backward on its calling thread), so the threads meet once per
  micro-batch rather than at every op's OpenMP barrier. Meant for one intra-op thread per
  batch thread (the caller sets it: ``torch.set_num_threads(1)``); see :func:`train_step`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hcomposer.errors import UserError

__all__ = [
    "DTYPES",
    "native_bf16",
    "resolve_dtype",
    "param_groups",
    "make_optimizer",
    "set_lr",
    "autocast",
    "resolve_device",
    "train_step",
    "split_rows",
    "evaluate",
    "EvalResult",
]

DTYPES = ("auto", "bf16", "fp32")


def native_bf16(device: torch.device | str) -> bool:
    """True where bf16 arithmetic is native and fast: a CUDA device that supports it, or a CPU
    with AVX512-BF16 or AMX. On a CPU without them (e.g. AVX2 only) bf16 autocast emulates
    the products and trains several times slower than fp32 (60-100 against 1,000+ tokens/s
    on a 2-core AVX2 host, docs/history/results-log.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # torch.cpu's probes are private; a torch without them is read as "not native".
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def resolve_dtype(dtype: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` where :func:`native_bf16` holds for ``device``, else ``fp32``."""
    if dtype == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return dtype


# A loss function takes a micro-batch (inputs, targets) and returns a scalar loss.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A scoring function returns (logits [K, V], labels [K]) at the positions that count.
ScoreFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` (or None): CUDA (this process's local rank) when available, else CPU.

    An unknown device, or CUDA on a machine without it, is a UserError.
    """
    if spec is None or spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {spec!r}: this machine has no CUDA device; use cpu or auto")
    return device


def param_groups(modules: nn.Module | Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups: decayed matrices and the rest (see the module docstring)."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    modules = list(modules)
    embed_ids = {
        id(m.weight) for mod in modules for m in mod.modules() if isinstance(m, nn.Embedding)
    }
    decay, no_decay, seen = [], [], set()
    for mod in modules:
        for p in mod.parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (decay if p.dim() >= 2 and id(p) not in embed_ids else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    modules: nn.Module | Iterable[nn.Module],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    device: torch.device | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, the fused kernel on CPU and CUDA (as ``transformers``'
    Trainer's default ``adamw_torch_fused``): on the 2-core CPU one step of a 10m model took
    about a fifth of the per-parameter loop's time (2026-12-07). Same update, within rounding:
    tests/test_fast_paths.py."""
    fused = torch.device(device).type in ("cpu", "cuda") if device is not None else True
    return torch.optim.AdamW(
        param_groups(modules, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused
    )


def autocast(device: torch.device | str, dtype: str):
    """bf16 autocast on ``device``'s type when ``dtype`` is (or resolves to) ``bf16``;
    nothing for fp32."""
    if resolve_dtype(dtype, device) == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def split_rows(rows: int, parts: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of ``min(parts, rows)`` row slices of near-equal size (the first ones
    one row longer), covering ``0..rows`` in order."""
    parts = max(1, min(parts, rows))
    size, extra = divmod(rows, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + size + (i < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def train_step(
    loss_fn: LossFn,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer | None,
    *,
    device: torch.device,
    dtype: str,
    grad_clip: float = 0.0,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_threads: int = 1,
) -> tuple[float, float | None]:
    """Forward and backward over the micro-batches, then one optimiser step.

    Gradients are averaged over the micro-batches; under DDP ``no_sync`` skips the gradient
    all-reduce of all but the last micro-batch and ``reduce`` averages the loss over ranks, so
    every rank takes the same decision on a non-finite loss. Returns ``(loss, grad_norm)``;
    ``grad_norm`` is None when the loss is not finite (nothing was updated). With
    ``optimizer=None`` only the gradients are computed (the efficiency suite's "none").

    ``batch_threads`` N > 1 (needs ``optimizer``; refused with ``no_sync``): each micro-batch
    is cut into ``min(N, rows)`` row slices (:func:`split_rows`) whose forward and backward run
    concurrently, one thread each (the calling thread takes the first). Slice ``i`` of ``r_i``
    of the micro-batch's ``r`` rows contributes ``r_i / r`` of the micro-batch's loss and
    gradient: the plain step's numbers when ``loss_fn`` is a mean over rows that count the same
    number of targets (``lm_loss`` with no ignored target, as in the trainer), up to rounding.
    Each thread takes its gradients with ``torch.autograd.grad`` (nothing shared is written
    while the threads run); they are then summed in slice order into ``.grad``, so the result
    does not depend on which thread finishes first. Autocast is entered inside each thread
    (its state is thread-local). The forward must not change shared module state (MoE routing
    statistics do: the trainer refuses the split for such models).
    """
    if batch_threads > 1:
        if optimizer is None:
            raise ValueError("train_step: batch_threads > 1 needs the optimizer's parameters")
        if no_sync is not None:
            raise ValueError("train_step: batch_threads > 1 does not work with DDP/FSDP")
    n = len(micro_batches)
    loss_sum = torch.zeros((), device=device)
    if batch_threads > 1:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        with ThreadPoolExecutor(batch_threads - 1, thread_name_prefix="batch") as pool:
            for x, y in micro_batches:
                loss_sum += _split_backward(
                    loss_fn, x, y, params, pool, batch_threads, n, device=device, dtype=dtype
                )
    else:
        for k, (x, y) in enumerate(micro_batches):
            ctx = no_sync() if no_sync is not None and k < n - 1 else contextlib.nullcontext()
            with ctx:
                with autocast(device, dtype):
                    loss = loss_fn(x, y)
                (loss / n).backward()
            loss_sum += loss.detach()
    mean = loss_sum / n
    if reduce is not None:
        mean = reduce(mean)
    value = float(mean)
    if optimizer is None:
        return value, None
    if not math.isfinite(value):
        optimizer.zero_grad(set_to_none=True)
        return value, None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value, float(norm)


def _split_backward(
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    params: list[torch.Tensor],
    pool: ThreadPoolExecutor,
    batch_threads: int,
    n: int,
    *,
    device: torch.device,
    dtype: str,
) -> torch.Tensor:
    """One micro-batch of :func:`train_step`'s split path: its row slices' forward and backward
    concurrently, gradients summed in slice order into ``.grad``; returns the micro-batch's
    (detached) loss."""
    rows = x.shape[0]
    bounds = split_rows(rows, batch_threads)
    if len(bounds) == 1:
        # One row: nothing to split.
        with autocast(device, dtype):
            loss = loss_fn(x, y)
        (loss / n).backward()
        return loss.detach()
    intra = torch.get_num_threads()

    def work(start: int, stop: int) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        # OpenMP's thread count is per thread: a new thread takes the caller's.
        if torch.get_num_threads() != intra:
            torch.set_num_threads(intra)
        share = (stop - start) / rows
        with autocast(device, dtype):
            loss = loss_fn(x[start:stop], y[start:stop])
        grads = torch.autograd.grad(loss * (share / n), params, allow_unused=True)
        return loss.detach() * share, grads

    futures = [pool.submit(work, *b) for b in bounds[1:]]
    try:
        first = work(*bounds[0])
    except BaseException:
        # No thread is left running into the next micro-batch or the caller's handler.
        wait(futures)
        raise
    results = [first] + [f.result() for f in futures]
    for j, p in enumerate(params):
        parts = [g[j] for _, g in results if g[j] is not None]
        if not parts:
            continue
        total = parts[0]
        for g in parts[1:]:
            total = total + g
        if p.grad is None:
            p.grad = total
        else:
            p.grad += total
    loss = results[0][0]
    for part, _ in results[1:]:
        loss = loss + part
    return loss


class EvalResult(NamedTuple):
    """Mean cross-entropy and accuracy over ``count`` scored targets."""

    loss: float
    accuracy: float
    count: int


@torch.no_grad()
def evaluate(
    score_fn: ScoreFn,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    dtype: str,
    modules: Iterable[nn.Module] = (),
) -> EvalResult:
    """Mean cross-entropy (fp32) and accuracy over every scored target of ``batches``.

    ``score_fn(x, y)`` returns logits and labels at the positions that count. The ``modules``
    are put in eval mode for the loop and restored afterwards. With no target the loss is nan.
    """
    modules = list(modules)
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    loss_sum, correct, total = 0.0, 0, 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast(device, dtype):
                logits, labels = score_fn(x, y)
            logits = logits.float().reshape(-1, logits.shape[-1])
            labels = labels.reshape(-1)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            total += int(labels.numel())
    finally:
        for m, w in zip(modules, was):
            m.train(w)
    if total == 0:
        return EvalResult(float("nan"), 0.0, 0)
    return EvalResult(loss_sum / total, correct / total, total)
