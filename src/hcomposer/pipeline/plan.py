"""What ``hcomposer run --recipe R`` will cost, before anything runs (``hcomposer plan``).

Per stage: tokens, FLOPs and the wall time at a stated MFU of a stated card, and for the
target and its baseline: parameters, memory per GPU while training (weights, gradients,
AdamW state, activations at the recipe's micro-batch and sequence length) and the KV cache
and recurrent state at the evaluation's longest context. FLOPs are matmul FLOPs
(``hcomposer.footprint``), a training token costs 3 forwards.

What is estimated and what is not:

- search: each trial's proxy runs at their step caps (early stops make a trial cheaper,
  restarts of stalled runs dearer); validation checks are left out. The search's pattern is
  not known before it runs: the cost is taken at a stand-in (the search's primitives in
  turn) and the target is the recipe's scaling of ``block`` (default: that stand-in).
- evaluation: loss, NIAH prompts and the MQAR curve's training; the efficiency probes (timed
  forwards, seconds) and lm-eval tasks (their size is the tasks' documents) are not estimated.
- wall time: FLOPs / (GPUs x peak x MFU); tiny proxy models reach a far lower MFU than a
  1B model, so the search's time is a lower bound.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.data import get_tokenizer
from hcomposer.data.mad import default_task_config
from hcomposer.errors import UserError
from hcomposer.footprint import matmul_flops_per_token, training_memory
from hcomposer.pipeline.scale import matched_baseline
from hcomposer.proxies.proxy import parse_proxy
from hcomposer.proxies.proxy_config import ProxyConfig
from hcomposer.recipes import Recipe
from hcomposer.scaling.extrapolate import extrapolate
from hcomposer.search.objectives import is_synthetic
from hcomposer.shapes import Shape, resolve_shape
from hcomposer.training.meter import matmul_peak

__all__ = ["GPUS", "Card", "card", "plan_recipe", "stand_in_block"]


@dataclass(frozen=True)
class Card:
    """One accelerator: dense bf16 peak FLOP/s and memory in bytes."""

    name: str
    peak_flops: float
    memory: float


# Dense (no sparsity) BF16 tensor-core peaks of the SXM parts, from NVIDIA's data sheets:
# H100 SXM 989 TFLOPS (1,979 "with sparsity"), 80 GB; H200 SXM the same peak, 141 GB;
# A100 SXM 312 TFLOPS (624 with sparsity), 80 GB.
GPUS: dict[str, Card] = {
    "h100": Card("H100 SXM 80GB", 989.4e12, 80e9),
    "h200": Card("H200 SXM 141GB", 989.4e12, 141e9),
    "a100": Card("A100 SXM 80GB", 312e12, 80e9),
}


def card(name: str, memory_gib: float | None = None) -> Card:
    """The card ``name`` (``cpu``: this machine's measured matmul peak and its RAM)."""
    if name == "cpu":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        found = Card(
            "this CPU (measured matmul peak)", matmul_peak(torch.device("cpu"), "fp32"), ram
        )
    elif name in GPUS:
        found = GPUS[name]
    else:
        raise UserError(f"unknown --gpu {name!r}; valid: {', '.join([*GPUS, 'cpu'])}")
    if memory_gib is not None:
        found = Card(f"{found.name}, {memory_gib:g} GiB", found.peak_flops, memory_gib * 2**30)
    return found


def stand_in_block(recipe: Recipe) -> str:
    """The search's primitives in turn over its positions (``AFAF...``): the plan's pattern."""
    prims = recipe.search.primitives
    return "".join(prims[i % len(prims)] for i in range(recipe.search.layers))


def _vocab(recipe: Recipe, shape: Shape) -> tuple[int, str]:
    """The vocabulary the trained model will have, and where it comes from."""
    spec = recipe.train.tokenizer
    if spec.startswith("bpe:") and spec[4:].isdigit():
        return -(-int(spec[4:]) // 64) * 64, f"{spec} (trained when the run starts)"
    if spec == "byte" or Path(spec).exists():
        tok = get_tokenizer(spec)
        return -(-tok.vocab_size // 64) * 64, f"tokenizer {spec}"
    return shape.vocab_size, f"the shape's (tokenizer {spec!r} is not loaded by the plan)"


def _models(recipe: Recipe, block: str) -> dict[str, Any]:
    shape = resolve_shape(recipe.target_shape)
    vocab, vocab_note = _vocab(recipe, shape)
    seq = recipe.train.seq_len
    shape = shape.replace(vocab_size=vocab, max_seq_len=max(shape.max_seq_len, seq))
    layers = recipe.target_layers or shape.n_layers
    target = Architecture(pattern=extrapolate(block, layers, recipe.scale_strategy), shape=shape)
    params = count_costs(target, seq_len=seq).params_total
    base_pattern, _ = matched_baseline(params, shape)
    baseline = Architecture(pattern=base_pattern, shape=shape)
    return {"target": target, "baseline": baseline, "vocab_note": vocab_note}


def _proxy_runs(recipe: Recipe) -> list[tuple[Shape, int, int]]:
    """(shape, tokens, sequence length) of each proxy run of one trial, at its step cap."""
    cfg = recipe.search.proxy_config or ProxyConfig()
    shape = recipe.search.shape
    if is_synthetic(recipe.search.proxy):
        return []  # a test facility: a score table, nothing trained
    kind, names = parse_proxy(recipe.search.proxy)
    grid = len(cfg.lrs) * len(cfg.weight_decays)
    runs = []
    if kind == "mad":
        by_name = {c.task: c for c in cfg.mad_tasks}
        for name in names or tuple(by_name):
            task = by_name.get(name) or default_task_config(name)
            tokens = grid * cfg.steps_for(name) * cfg.batch_for(name) * task.seq_len
            runs.append((shape.replace(vocab_size=task.vocab_size), tokens, task.seq_len))
    elif kind == "mqar":
        for task in cfg.mqar_tasks:
            tokens = grid * cfg.steps * cfg.batch_size * task.seq_len
            runs.append((shape.replace(vocab_size=task.vocab_size), tokens, task.seq_len))
    elif kind == "text":
        runs.append((shape, cfg.text_tokens, cfg.text_seq_len))
    return runs


def _stage(name: str, tokens: float, flops: float, note: str) -> dict[str, Any]:
    return {"stage": name, "tokens": tokens, "flops": flops, "note": note}


def _search_stage(recipe: Recipe, block: str) -> dict[str, Any]:
    trials = recipe.search.trials + recipe.rescore_top * recipe.rescore_seeds
    pattern = block[: recipe.search.layers]
    tokens = flops = 0.0
    for shape, n, seq in _proxy_runs(recipe):
        arch = Architecture(pattern=pattern, shape=shape.replace(max_seq_len=max(seq, 2)))
        tokens += n
        flops += 3.0 * n * matmul_flops_per_token(arch, seq)
    note = (
        f"{trials} trials ({recipe.search.trials} + {recipe.rescore_top} x "
        f"{recipe.rescore_seeds} re-scores) x proxy {recipe.search.proxy} at its step caps, "
        f"pattern {pattern}; the time is a lower bound (tiny models run far below the MFU)"
    )
    return _stage("search", trials * tokens, trials * flops, note)


def _train_stage(role: str, arch: Architecture, recipe: Recipe) -> dict[str, Any]:
    t = recipe.train
    per_token = matmul_flops_per_token(arch, t.seq_len)
    validations = (t.total_steps // t.eval_every if t.eval_every else 0) + 1
    val_tokens = validations * t.eval_tokens
    n = recipe.train_seeds
    tokens = n * (t.tokens + val_tokens)
    flops = n * (3.0 * t.tokens + val_tokens) * per_token
    note = f"{n} x ({t.tokens:,} tokens + {validations} validations of {t.eval_tokens:,})"
    return _stage(f"train {role}", tokens, flops, note)


def eval_context(recipe: Recipe) -> int:
    """The longest context the evaluation runs (NIAH prompts, efficiency probes)."""
    seq = recipe.train.seq_len
    eff = recipe.eval.efficiency
    longest = max(eff.contexts or (eff.max_len or 4 * seq,))
    if "niah" in recipe.eval.suites:
        longest = max(longest, *recipe.eval.niah.resolve_lengths(seq))
    return longest


def _eval_stage(arch: Architecture, recipe: Recipe) -> dict[str, Any]:
    ev, seq = recipe.eval, recipe.train.seq_len
    tokens = flops = 0.0
    parts = []
    if "loss" in ev.suites:
        tokens += recipe.train.eval_tokens
        flops += recipe.train.eval_tokens * matmul_flops_per_token(arch, seq)
        parts.append("loss")
    if "niah" in ev.suites:
        n = len(ev.niah.depths) * ev.niah.trials
        for length in ev.niah.resolve_lengths(seq):
            flops += n * (length + ev.niah.max_new_tokens) * matmul_flops_per_token(arch, length)
            tokens += n * (length + ev.niah.max_new_tokens)
        parts.append("niah")
    if "mqar" in ev.suites:
        shape = resolve_shape(ev.mqar.shape) if ev.mqar.shape else arch.shape
        for length in ev.mqar.lengths:
            small = Architecture(
                pattern=arch.pattern,
                shape=shape.replace(
                    vocab_size=ev.mqar.vocab_size, max_seq_len=max(length, shape.max_seq_len)
                ),
            )
            n = len(ev.mqar.lrs) * ev.mqar.steps * ev.mqar.batch_size * length
            tokens += n
            flops += 3.0 * n * matmul_flops_per_token(small, length)
        parts.append("mqar")
    skipped = [s for s in ev.suites if s.startswith("lm-eval")]
    note = "+".join(parts) + ("; lm-eval not estimated" if skipped else "")
    return _stage("evaluate", tokens, flops, note)


def _model_row(role: str, arch: Architecture, recipe: Recipe, gpus: int, context: int) -> dict:
    t = recipe.train
    costs = count_costs(arch, seq_len=t.seq_len)
    micro = math.ceil(t.batch_size / (gpus * t.grad_accum))
    shards = gpus if t.fsdp else 1
    # bf16 autocast where the card has it (every card of the table); the CPU plan is fp32.
    mem = training_memory(
        arch, costs.params_total, micro_batch=micro, seq_len=t.seq_len, shards=shards
    )
    kv = costs.kv_bytes_per_token * context + costs.state_bytes
    return {
        "role": role,
        "pattern": arch.pattern,
        "params_total": costs.params_total,
        "params_active": costs.params_active,
        "params_non_embedding": costs.params_non_embedding,
        "train_memory": mem.to_dict(),
        "sharding": f"FSDP over {gpus}" if t.fsdp and gpus > 1 else "replicated",
        "eval_context": context,
        "cache_bytes": kv,
        "eval_memory": 2.0 * costs.params_total + kv,
    }


def plan_recipe(
    recipe: Recipe, *, gpus: int, gpu: Card, mfu: float, block: str | None = None
) -> dict[str, Any]:
    """The plan of ``recipe`` on ``gpus`` cards ``gpu`` at ``mfu`` (see the module docstring)."""
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1 (got {gpus})")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1] (got {mfu:g})")
    t = recipe.train
    if t.batch_size < gpus * t.grad_accum:
        raise UserError(
            f"--gpus {gpus}: the recipe's batch of {t.batch_size} sequences "
            f"({t.grad_accum} accumulation steps) leaves some GPUs without a sequence"
        )
    block = block or stand_in_block(recipe)
    models = _models(recipe, block)
    context = eval_context(recipe)
    rows = [_model_row(r, models[r], recipe, gpus, context) for r in ("target", "baseline")]
    stages = [
        _search_stage(recipe, stand_in_block(recipe)),
        _stage("aggregate + scale", 0.0, 0.0, "k-means and votes over the trials; seconds"),
        _train_stage("target", models["target"], recipe),
        _train_stage("baseline", models["baseline"], recipe),
        _eval_stage(models["target"], recipe),
        _eval_stage(models["baseline"], recipe),
    ]
    stages[-1]["stage"] = "evaluate baseline"
    stages[-2]["stage"] = "evaluate target"
    rate = gpus * gpu.peak_flops * mfu
    for s in stages:
        s["seconds"] = s["flops"] / rate
    need = max(r["train_memory"]["total"] for r in rows)
    return {
        "recipe": recipe.name,
        "gpus": gpus,
        "gpu": gpu.name,
        "peak_flops_per_gpu": gpu.peak_flops,
        "memory_per_gpu": gpu.memory,
        "mfu": mfu,
        "seq_len": t.seq_len,
        "block": block,
        "vocab": models["target"].shape.vocab_size,
        "vocab_note": models["vocab_note"],
        "models": rows,
        "stages": stages,
        "total_flops": sum(s["flops"] for s in stages),
        "total_seconds": sum(s["seconds"] for s in stages),
        "gpu_hours": gpus * sum(s["seconds"] for s in stages) / 3600,
        "fits": need <= gpu.memory,
        "memory_needed": need,
    }
