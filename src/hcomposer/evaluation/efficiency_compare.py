"""Efficiency of several models side by side, measured in one process, interleaved.

``compare_efficiency`` (used by ``hcomposer compare --interleaved`` and the pipeline's report)
times, each round, one training step (the same settings for every model), one prefill and
``decode_steps`` decode steps of every model in turn (see ``evaluation/interleave.py``), on the
efficiency suite's clock (``evaluation/efficiency.py``). Medians and [min, max] come with every
figure, and each ratio to the first model is the median of per-round ratios, so load from
other processes cancels out of it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from hcomposer.accounting import count_costs
from hcomposer.errors import UserError
from hcomposer.evaluation.efficiency import (
    EfficiencyConfig,
    clock_name,
    clock_now,
    context_lengths,
    device_for,
    kernels_status,
    train_settings,
    training_step,
)
from hcomposer.evaluation.interleave import measure_interleaved
from hcomposer.training.trainer import TrainConfig, load_run

__all__ = ["compare_efficiency", "measure_runs_interleaved", "interleaved_markdown"]


def _clock(device: torch.device):
    """(timer, sync) for interleaved timing: the suite's clock, synchronised on CUDA."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return (lambda: clock_now(device)), sync


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
    device = device_for(cfg.device)
    labels = list(models)
    rounds = _Rounds(labels, device, cfg.repeats)
    costs = {lab: count_costs(m.arch, seq_len=train_len, dtype_bytes=_dtype_bytes(m))
             for lab, m in models.items()}  # fmt: skip
    models = {lab: m.to(device).eval() for lab, m in models.items()}
    tl = cfg.train_len or train_len
    torch.manual_seed(cfg.seed)
    steps = {lab: training_step(m, cfg, tl, device, train) for lab, m in models.items()}
    speeds = rounds.speeds("train", steps, cfg.train_batch * tl)
    results = {
        lab: {
            "train": {
                "batch": cfg.train_batch,
                "seq_len": tl,
                **train_settings(cfg, train, device),
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
            "device": str(device), "clock": clock_name(device), "stopped": stopped,
            "threads": torch.get_num_threads(), "reference": labels[0],
            "decode_kernels": kernels_status(device)}  # fmt: skip


def _compare_contexts(models, cfg, train_len, device, rounds: _Rounds, costs, results):
    """Prefill and decode of every model at each context length, interleaved, into
    ``results[label]["inference"]``; returns why the sweep stopped early (None if it did not)."""
    for L in context_lengths(cfg, train_len):
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
