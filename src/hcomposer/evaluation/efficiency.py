"""Efficiency: training, prefill and decode throughput against context length, peak memory,
and KV / state bytes from the accounting.

- training tokens/s: one step of the training core (``hcomposer.training.step.train_step``, the
  trainer's step) on a copy of the model (the evaluated weights are never touched), batch
  ``train_batch`` x ``train_len``, with the trainer's loss, AdamW (parameter groups, weight
  decay, betas), autocast dtype and gradient clipping, read from a ``TrainConfig`` (the run's,
  in the suite; the trainer's defaults otherwise);
- prefill tokens/s at context length L: one forward of ``batch`` x L tokens into
  a fresh cache;
- decode tokens/s at context length L: ``decode_steps`` single-token steps of the
  whole batch after that prefill, so each step attends to about L tokens;
- times on the process's CPU clock on CPU with one thread (so that other processes'
  load is not counted), wall time otherwise (recorded as ``clock``);
- peak memory of each measurement: on CUDA ``torch.cuda.max_memory_allocated``
  (tensors only, reset before each measurement); on CPU the process's peak
  resident set size (``VmHWM`` from /proc/self/status, reset through
  /proc/self/clear_refs), minus the resident size just before the measurement —
  it includes allocator slack and anything else the process allocates, so read
  it as an upper bound. Where VmHWM cannot be reset, the ``ru_maxrss`` growth
  (a lower bound: 0 once an earlier step was larger) is reported and labelled.
- KV bytes (grow with L) and state bytes (fixed per sequence) come from
  ``count_costs`` at the model's dtype and are reported per measurement.
- decode roofline at L: a step must read every weight and the whole cache once, so
  tokens/s <= batch x read bandwidth / (weight bytes + KV bytes at L + state bytes); the read
  bandwidth is the fastest of three sums over a ``bandwidth_probe_mib`` fp32 tensor, timed
  just before the decode measurement. The fraction reached is reported beside it.

Lengths double from ``min_len`` to ``max_len``; a length that runs out of memory
or over ``max_seconds`` is recorded with its reason and the sweep stops there.
Each timing is the median of ``repeats`` runs after one warm-up.

Comparisons of several models, measured interleaved: ``evaluation/efficiency_compare.py``.
"""

from __future__ import annotations

import copy
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hcomposer.accounting import count_costs
from hcomposer.errors import UserError
from hcomposer.model import lm_loss
from hcomposer.plots import save_png, subplots
from hcomposer.primitives import cpu_kernels
from hcomposer.training import step as core
from hcomposer.training.step import make_optimizer, resolve_dtype
from hcomposer.training.trainer import TrainConfig

__all__ = ["EfficiencyConfig", "run_efficiency", "plot_efficiency", "efficiency_markdown"]


@dataclass(frozen=True, kw_only=True)
class EfficiencyConfig:
    batch: int = 1
    min_len: int = 128
    max_len: int | None = None  # None: 4x the training length
    # Explicit context lengths (e.g. (1024, 4096, 8192, 16384)); None: double min_len..max_len.
    contexts: tuple[int, ...] | None = None
    # Decode roofline: time a sum over a tensor of this many MiB (fp32) before each decode
    # measurement; 0 turns it off.
    bandwidth_probe_mib: int = 256
    decode_steps: int = 16
    train_batch: int = 4
    train_len: int | None = None  # None: the training length
    # "adamw" (what the trainer uses) or "none" (forward + backward only: skips the
    # optimizer, whose first construction imports torch._dynamo, seconds on a busy CPU).
    train_optimizer: str = "adamw"
    repeats: int = 3
    max_seconds: float = 60.0
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch < 1 or self.min_len < 2 or self.decode_steps < 1 or self.repeats < 1:
            raise UserError("efficiency: batch, min_len, decode_steps and repeats must be positive")
        if self.train_optimizer not in ("adamw", "none"):
            raise UserError("efficiency: train_optimizer must be 'adamw' or 'none'")
        if self.contexts is not None:
            object.__setattr__(self, "contexts", tuple(int(c) for c in self.contexts))
            if not self.contexts or min(self.contexts) < 2:
                raise UserError("efficiency: contexts must be lengths >= 2")
        if self.bandwidth_probe_mib < 0:
            raise UserError("efficiency: bandwidth_probe_mib must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def device_for(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak bytes of one measurement; ``method`` says how it was measured."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda max_memory_allocated"
        if device.type != "cuda":
            self.method = (
                "cpu VmHWM - VmRSS (peak resident set, reset via /proc/self/clear_refs)"
                if _can_reset_hwm()
                else "cpu ru_maxrss growth (lower bound)"
            )

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif _can_reset_hwm():
            _reset_hwm()
            self.base = _status_kb("VmRSS") * 1024
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif _can_reset_hwm():
            self.peak = _status_kb("VmHWM") * 1024 - self.base
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        self.peak = max(0, int(self.peak))
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


_HWM_OK: bool | None = None


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _can_reset_hwm() -> bool:
    global _HWM_OK
    if _HWM_OK is None:
        try:
            _reset_hwm()
            _status_kb("VmHWM")
            _HWM_OK = True
        except OSError:
            _HWM_OK = False
    return _HWM_OK


def clock_now(device: torch.device) -> float:
    """The suite's clock: CPU time of this process on CPU with one thread (time spent
    descheduled by other processes does not count; equal to wall time on an idle core),
    wall time otherwise."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time()
    return time.perf_counter()


def clock_name(device: torch.device) -> str:
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return "cpu process time"
    return "wall time" + (", synchronised" if device.type == "cuda" else "")


def _timed(fn, device, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = clock_now(device)
        fn()
        _sync(device)
        times.append(clock_now(device) - t)
    return statistics.median(times)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def training_step(model, cfg: EfficiencyConfig, train_len: int, device, train: TrainConfig):
    """One step of the training core on a copy of ``model``, as a closure: the trainer's loss,
    optimiser, autocast and clipping (from ``train``); ``train_optimizer="none"`` computes the
    gradients only."""
    m = copy.deepcopy(model).to(device).train()
    opt = None
    if cfg.train_optimizer == "adamw":
        opt = make_optimizer(
            m, lr=train.lr, weight_decay=train.weight_decay, betas=train.betas, device=device
        )
    g = torch.Generator().manual_seed(cfg.seed)
    V = m.arch.shape.vocab_size
    x = torch.randint(0, V, (cfg.train_batch, train_len + 1), generator=g).to(device)
    batch = [(x[:, :-1], x[:, 1:])]

    def loss_fn(inputs, targets):
        return lm_loss(m(inputs), targets)

    def step():
        if opt is None:
            # Gradients only: each step starts from none, as after the optimiser's zero_grad.
            m.zero_grad(set_to_none=True)
        # Looked up on the module at every call: the trainer's step, whatever it is now.
        core.train_step(
            loss_fn, batch, opt, device=device, dtype=train.dtype, grad_clip=train.grad_clip
        )

    return step


def train_settings(cfg: EfficiencyConfig, train: TrainConfig, device) -> dict[str, Any]:
    return {
        "optimizer": cfg.train_optimizer,
        "precision": resolve_dtype(train.dtype, device),
        "grad_clip": train.grad_clip,
    }


def _train_throughput(
    model, cfg: EfficiencyConfig, train_len: int, device, train: TrainConfig
) -> dict[str, Any]:
    step = training_step(model, cfg, train_len, device, train)
    with _PeakMemory(device) as mem:
        t = _timed(step, device, cfg.repeats)
    return {
        "batch": cfg.train_batch,
        "seq_len": train_len,
        **train_settings(cfg, train, device),
        "seconds_per_step": t,
        "tokens_per_s": cfg.train_batch * train_len / t,
        "peak_bytes": mem.peak,
    }


@torch.no_grad()
def _inference_point(model, L: int, cfg: EfficiencyConfig, device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(cfg.seed + L)
    V = model.arch.shape.vocab_size
    prompt = torch.randint(0, V, (cfg.batch, L), generator=g).to(device)
    nxt = torch.randint(0, V, (cfg.batch, 1), generator=g).to(device)
    total = L + cfg.decode_steps + 1

    def prefill():
        cache = model.init_cache(cfg.batch, total)
        model(prompt, cache=cache)

    with _PeakMemory(device) as mem_p:
        t_prefill = _timed(prefill, device, cfg.repeats)

    def decode():
        cache = model.init_cache(cfg.batch, total)
        model(prompt, cache=cache)
        _sync(device)
        t0 = clock_now(device)
        for _ in range(cfg.decode_steps):
            model(nxt, cache=cache)
        _sync(device)
        return clock_now(device) - t0

    decode()
    bandwidth = _read_bandwidth(cfg.bandwidth_probe_mib, device)
    with _PeakMemory(device) as mem_d:
        t_decode = statistics.median(decode() for _ in range(cfg.repeats))
    return {
        "read_bandwidth_Bps": bandwidth,
        "context": L,
        "prefill_s": t_prefill,
        "prefill_tokens_per_s": cfg.batch * L / t_prefill,
        "decode_s_per_token": t_decode / cfg.decode_steps,
        "decode_tokens_per_s": cfg.batch * cfg.decode_steps / t_decode,
        "prefill_peak_bytes": mem_p.peak,
        "decode_peak_bytes": mem_d.peak,
    }


def run_efficiency(
    model,
    *,
    train_len: int,
    config: EfficiencyConfig | None = None,
    progress=None,
    train: TrainConfig | None = None,
) -> dict[str, Any]:
    """The efficiency sweep for ``model``; returns a JSON-ready dict (see module docstring).
    ``train``: the settings of its training step (the trainer's defaults if None)."""
    cfg = config or EfficiencyConfig()
    device = device_for(cfg.device)
    arch = model.arch
    dtype = next(model.parameters()).dtype
    dtype_bytes = torch.finfo(dtype).bits // 8
    model = model.to(device).eval()
    lengths = context_lengths(cfg, train_len)
    weight_bytes = _weight_bytes(model)
    torch.manual_seed(cfg.seed)
    train = train or TrainConfig()
    train_res = _train_throughput(model, cfg, cfg.train_len or train_len, device, train)
    # KV bytes per token and state bytes per sequence do not depend on the length.
    costs = count_costs(arch, seq_len=train_len, dtype_bytes=dtype_bytes)
    points, stopped = [], None
    for L in lengths:
        t0 = time.perf_counter()
        try:
            p = _inference_point(model, L, cfg, device)
        except (RuntimeError, MemoryError) as e:
            if not _is_oom(e) and not isinstance(e, MemoryError):
                raise
            stopped = f"out of memory at context {L}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            break
        points.append(_add_cache_bytes(p, L, cfg, costs, weight_bytes))
        if progress is not None:
            progress()
        if time.perf_counter() - t0 > cfg.max_seconds:
            stopped = f"context {L} took over {cfg.max_seconds:g}s; longer ones skipped"
            break
    return {
        "config": cfg.to_dict(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu(),
        "threads": torch.get_num_threads(),
        "clock": clock_name(device),
        "decode_kernels": kernels_status(device),
        "dtype": str(dtype).replace("torch.", ""),
        "memory_method": _PeakMemory(device).method,
        "params_total": costs.params_total,
        "kv_bytes_per_token": costs.kv_bytes_per_token,
        "state_bytes_per_sequence": costs.state_bytes,
        "flops_per_token": costs.flops_per_token,
        "train": train_res,
        "inference": points,
        "stopped": stopped,
    }


def _add_cache_bytes(p: dict, L: int, cfg: EfficiencyConfig, costs, weight_bytes: int) -> dict:
    """Point ``p`` at context ``L`` with its KV and state bytes and its decode roofline."""
    p["kv_bytes"] = costs.kv_bytes_per_token * L * cfg.batch
    p["state_bytes"] = costs.state_bytes * cfg.batch
    if p.get("read_bandwidth_Bps"):
        # One decode step of the batch reads every weight once and every cache once.
        step_bytes = weight_bytes + p["kv_bytes"] + p["state_bytes"]
        roof = cfg.batch * p["read_bandwidth_Bps"] / step_bytes
        p["decode_bytes_per_step"] = step_bytes
        p["decode_roofline_tokens_per_s"] = roof
        p["decode_roofline_fraction"] = p["decode_tokens_per_s"] / roof
    return p


def kernels_status(device: torch.device) -> str:
    """Whether the fused CPU decode kernels are built (they serve bf16 models on CPU only)."""
    return cpu_kernels.status() if device.type == "cpu" else "not used (not a CPU)"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return "cpu"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def efficiency_markdown(res: dict[str, Any]) -> str:
    t = res["train"]
    lines = [
        f"Device: {res['device_name']} ({res['device']}, {res['threads']} threads, clock: "
        f"{res.get('clock', 'wall time')}), "
        f"dtype {res['dtype']}. Peak memory: {res['memory_method']}. "
        f"CPU decode kernels (bf16 models): {res.get('decode_kernels', 'not recorded')}.",
        "",
        f"Training: {t['tokens_per_s']:,.0f} tokens/s (batch {t['batch']} x {t['seq_len']}, "
        f"{_step_text(t)}peak {_mib(t['peak_bytes'])} MiB). KV {res['kv_bytes_per_token']} "
        f"B/token, state {res['state_bytes_per_sequence']} B/sequence.",
        "",
        "| context | prefill tok/s | decode tok/s | decode roofline | prefill peak MiB "
        "| decode peak MiB | KV MiB | state MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in res["inference"]:
        frac = p.get("decode_roofline_fraction")
        roof = "-" if frac is None else f"{frac:.0%} of {p['decode_roofline_tokens_per_s']:,.0f}"
        lines.append(
            f"| {p['context']} | {p['prefill_tokens_per_s']:,.0f} | "
            f"{p['decode_tokens_per_s']:,.1f} | {roof} | {_mib(p['prefill_peak_bytes'])} | "
            f"{_mib(p['decode_peak_bytes'])} | {_mib(p['kv_bytes'])} | {_mib(p['state_bytes'])} |"
        )
    if res.get("stopped"):
        lines += ["", f"Sweep stopped: {res['stopped']}."]
    return "\n".join(lines)


def _step_text(t: dict[str, Any]) -> str:
    """The training step's settings (results written before they were recorded have none)."""
    if "precision" not in t:
        return ""
    return f"{t['optimizer']}, {t['precision']}, clip {t['grad_clip']:g}; "


def plot_efficiency(results: dict[str, dict[str, Any]], path: str | Path) -> None:
    """Prefill and decode tokens/s, and cache bytes, against context (one line per label)."""
    fig, axes = subplots(1, 3, figsize=(12, 3.6))
    for label, res in results.items():
        xs = [p["context"] for p in res["inference"]]
        axes[0].plot(xs, [p["prefill_tokens_per_s"] for p in res["inference"]], "o-", label=label)
        axes[1].plot(xs, [p["decode_tokens_per_s"] for p in res["inference"]], "o-", label=label)
        axes[2].plot(
            xs, [(p["kv_bytes"] + p["state_bytes"]) / 2**20 for p in res["inference"]], "o-",
            label=label,
        )  # fmt: skip
    titles = ("prefill tokens/s", "decode tokens/s", "KV + state MiB")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def _weight_bytes(model) -> int:
    """Bytes of the parameters, each tensor once (a tied embedding and head count once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


def _read_bandwidth(mib: int, device: torch.device) -> float | None:
    """Bytes/s of the fastest of 3 sums over an fp32 tensor of ``mib`` MiB (None if mib is 0)."""
    if not mib:
        return None
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    x.sum()
    best = float("inf")
    for _ in range(3):
        _sync(device)
        t0 = clock_now(device)
        x.sum()
        _sync(device)
        best = min(best, clock_now(device) - t0)
    return x.numel() * 4 / best


def context_lengths(cfg: EfficiencyConfig, train_len: int) -> list[int]:
    if cfg.contexts:
        return sorted(set(cfg.contexts))
    max_len = cfg.max_len or 4 * train_len
    out, n = [], cfg.min_len
    while n <= max_len:
        out.append(n)
        n *= 2
    return out
