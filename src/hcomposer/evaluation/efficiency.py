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

Comparisons (``compare_efficiency``, used by ``hcomposer compare --interleaved`` and the
pipeline's report) measure the models of a comparison in one process, interleaved: each
round times one training step (the same settings for every model), one prefill and
``decode_steps`` decode steps of every model in turn (see ``evaluation/interleave.py``), on the
suite's clock. Medians and [min, max] come with every figure, and each ratio to the first
model is the median of per-round ratios, so load from other processes cancels out of it.
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
from hcomposer.evaluation.interleave import measure_interleaved
from hcomposer.model import lm_loss
from hcomposer.plots import save_png, subplots
from hcomposer.primitives import cpu_kernels
from hcomposer.training import step as core
from hcomposer.training.step import make_optimizer, resolve_dtype
from hcomposer.training.trainer import TrainConfig, load_run

__all__ = [
    "EfficiencyConfig",
    "run_efficiency",
    "compare_efficiency",
    "measure_runs_interleaved",
    "interleaved_markdown",
    "plot_efficiency",
    "efficiency_markdown",
]


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


def _device(spec: str) -> torch.device:
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


def _now(device: torch.device) -> float:
    """The suite's clock: CPU time of this process on CPU with one thread (time spent
    descheduled by other processes does not count; equal to wall time on an idle core),
    wall time otherwise."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time()
    return time.perf_counter()


def _clock_name(device: torch.device) -> str:
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return "cpu process time"
    return "wall time" + (", synchronised" if device.type == "cuda" else "")


def _timed(fn, device, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = _now(device)
        fn()
        _sync(device)
        times.append(_now(device) - t)
    return statistics.median(times)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _training_step(model, cfg: EfficiencyConfig, train_len: int, device, train: TrainConfig):
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


def _train_settings(cfg: EfficiencyConfig, train: TrainConfig, device) -> dict[str, Any]:
    return {
        "optimizer": cfg.train_optimizer,
        "precision": resolve_dtype(train.dtype, device),
        "grad_clip": train.grad_clip,
    }


def _train_throughput(
    model, cfg: EfficiencyConfig, train_len: int, device, train: TrainConfig
) -> dict[str, Any]:
    step = _training_step(model, cfg, train_len, device, train)
    with _PeakMemory(device) as mem:
        t = _timed(step, device, cfg.repeats)
    return {
        "batch": cfg.train_batch,
        "seq_len": train_len,
        **_train_settings(cfg, train, device),
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
        t0 = _now(device)
        for _ in range(cfg.decode_steps):
            model(nxt, cache=cache)
        _sync(device)
        return _now(device) - t0

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
    device = _device(cfg.device)
    arch = model.arch
    dtype = next(model.parameters()).dtype
    dtype_bytes = torch.finfo(dtype).bits // 8
    model = model.to(device).eval()
    lengths = _lengths(cfg, train_len)
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
        "clock": _clock_name(device),
        "decode_kernels": _kernels(device),
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


def _kernels(device: torch.device) -> str:
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
        t0 = _now(device)
        x.sum()
        _sync(device)
        best = min(best, _now(device) - t0)
    return x.numel() * 4 / best


def _clock(device: torch.device):
    """(timer, sync) for interleaved timing: the suite's clock, synchronised on CUDA."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return (lambda: _now(device)), sync


def _lengths(cfg: EfficiencyConfig, train_len: int) -> list[int]:
    if cfg.contexts:
        return sorted(set(cfg.contexts))
    max_len = cfg.max_len or 4 * train_len
    out, n = [], cfg.min_len
    while n <= max_len:
        out.append(n)
        n *= 2
    return out


@torch.no_grad()
def _context_fns(model, L: int, cfg: EfficiencyConfig, device, rounds: int):
    """(prefill, decode) closures at context L; decode continues one cache, round after round."""
    g = torch.Generator().manual_seed(cfg.seed + L)
    V = model.arch.shape.vocab_size
    prompt = torch.randint(0, V, (cfg.batch, L), generator=g).to(device)
    nxt = torch.randint(0, V, (cfg.batch, 1), generator=g).to(device)

    def prefill():
        with torch.no_grad():
            model(prompt, cache=model.init_cache(cfg.batch, L + 1))

    cache = model.init_cache(cfg.batch, L + cfg.decode_steps * rounds + 1)
    model(prompt, cache=cache)

    def decode():
        with torch.no_grad():
            for _ in range(cfg.decode_steps):
                model(nxt, cache=cache)

    return prefill, decode


class _Rounds:
    """Interleaved measurements of every model, and each one's paired ratios to the first."""

    def __init__(self, labels: list[str], device: torch.device, repeats: int):
        self.labels, self.repeats = labels, repeats
        self.timer, self.sync = _clock(device)
        self.ratios: dict[str, dict[str, Any]] = {lab: {} for lab in labels[1:]}

    def speeds(self, metric: str, fns: dict[str, Any], work: float) -> dict[str, Any]:
        """Time ``fns`` interleaved; ``work`` units per call -> each label's speed spread."""
        res = measure_interleaved(fns, repeats=self.repeats, timer=self.timer, sync=self.sync)
        for lab in self.labels[1:]:
            self.ratios[lab][metric] = res.ratio(self.labels[0], lab).to_dict()
        return {lab: res.summary(lab).map(lambda t: work / t) for lab in self.labels}


def compare_efficiency(
    models: dict[str, Any],
    *,
    train_len: int,
    config: EfficiencyConfig | None = None,
    train: TrainConfig | None = None,
) -> dict[str, Any]:
    """Training, prefill and decode speed of several models measured interleaved (see above).

    Returns ``{"models": {label: run_efficiency-like dict}, "ratios": {label: {metric: spread}},
    "clock", "config"}``; ratios are speeds relative to the first label (> 1: faster). Every
    model's training step uses ``train``'s settings (the trainer's defaults if None), so the
    ratios compare architectures, not settings.
    """
    if not models:
        raise UserError("compare_efficiency: no models")
    cfg = config or EfficiencyConfig()
    train = train or TrainConfig()
    device = _device(cfg.device)
    labels = list(models)
    rounds = _Rounds(labels, device, cfg.repeats)
    costs = {lab: count_costs(m.arch, seq_len=train_len, dtype_bytes=_dtype_bytes(m))
             for lab, m in models.items()}  # fmt: skip
    models = {lab: m.to(device).eval() for lab, m in models.items()}
    tl = cfg.train_len or train_len
    torch.manual_seed(cfg.seed)
    steps = {lab: _training_step(m, cfg, tl, device, train) for lab, m in models.items()}
    speeds = rounds.speeds("train", steps, cfg.train_batch * tl)
    results = {
        lab: {
            "train": {
                "batch": cfg.train_batch,
                "seq_len": tl,
                **_train_settings(cfg, train, device),
                "tokens_per_s": speeds[lab].median,
                "tokens_per_s_spread": speeds[lab].to_dict(),
            },
            "inference": [],
            "kv_bytes_per_token": costs[lab].kv_bytes_per_token,
            "state_bytes_per_sequence": costs[lab].state_bytes,
        }
        for lab in labels
    }
    stopped = _compare_contexts(models, cfg, train_len, device, rounds, costs, results)
    return {"models": results, "ratios": rounds.ratios, "config": cfg.to_dict(),
            "device": str(device), "clock": _clock_name(device), "stopped": stopped,
            "threads": torch.get_num_threads(), "reference": labels[0],
            "decode_kernels": _kernels(device)}  # fmt: skip


def _compare_contexts(models, cfg, train_len, device, rounds: _Rounds, costs, results):
    """Prefill and decode of every model at each context length, interleaved, into
    ``results[label]["inference"]``; returns why the sweep stopped early (None if it did not)."""
    for L in _lengths(cfg, train_len):
        t0 = time.perf_counter()
        # One warm-up round before the timed ones: the decode cache holds them all.
        fns = {lab: _context_fns(m, L, cfg, device, cfg.repeats + 1) for lab, m in models.items()}
        prefill = rounds.speeds(
            f"prefill@{L}", {lab: f[0] for lab, f in fns.items()}, cfg.batch * L
        )
        decode = rounds.speeds(f"decode@{L}", {lab: f[1] for lab, f in fns.items()},
                               cfg.batch * cfg.decode_steps)  # fmt: skip
        for lab, out in results.items():
            out["inference"].append({
                "context": L,
                "prefill_tokens_per_s": prefill[lab].median,
                "decode_tokens_per_s": decode[lab].median,
                "prefill_tokens_per_s_spread": prefill[lab].to_dict(),
                "decode_tokens_per_s_spread": decode[lab].to_dict(),
                "kv_bytes": costs[lab].kv_bytes_per_token * L * cfg.batch,
                "state_bytes": costs[lab].state_bytes * cfg.batch,
            })  # fmt: skip
        if time.perf_counter() - t0 > cfg.max_seconds:
            return f"context {L} took over {cfg.max_seconds:g}s; longer ones skipped"
    return None


def _dtype_bytes(model) -> int:
    return torch.finfo(next(model.parameters()).dtype).bits // 8


def measure_runs_interleaved(
    run_dirs: list[str | Path], labels: list[str], config: EfficiencyConfig | None = None
) -> dict[str, Any]:
    """``compare_efficiency`` of the latest checkpoints of several run folders; every model's
    training step uses the first (reference) run's training settings."""
    models, train_len, train = {}, 0, None
    for d, lab in zip(run_dirs, labels, strict=True):
        model, arch, _tok, info = load_run(d)
        cfg = info.get("config") or {}
        stored = cfg.get("train", cfg) or {}
        seq = stored.get("seq_len") or arch.shape.max_seq_len
        train_len = max(train_len, int(seq))
        train = train or TrainConfig.from_dict(stored)
        models[lab] = model
    return compare_efficiency(models, train_len=train_len, config=config, train=train)


def _spread_text(d: dict[str, Any], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(d['median'])} [{fmt.format(d['min'])}, {fmt.format(d['max'])}]"


def interleaved_markdown(res: dict[str, Any]) -> str:
    """The paired speed ratios of ``compare_efficiency`` as a Markdown table."""
    labels = list(res["ratios"])
    metrics = list(next(iter(res["ratios"].values()), {}))
    lines = [
        f"Measured interleaved in one process ({res['clock']}, {res['threads']} threads, "
        f"{res['config']['repeats']} rounds; CPU decode kernels (bf16 models): "
        f"{res.get('decode_kernels', 'not recorded')}): speed relative to "
        f"**{res['reference']}**, median [min, max] of per-round ratios.",
        "",
        "| metric | " + " | ".join(f"{lab} / {res['reference']}" for lab in labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for m in metrics:
        cells = " | ".join(_spread_text(res["ratios"][lab][m]) for lab in labels)
        lines.append(f"| {m} | {cells} |")
    return "\n".join(lines)
