"""Achieved training FLOP/s of a model as a fraction of this CPU's measured matmul peak.

The peak is the best rate of large square matmuls (fp32, and bf16 inputs); the model's rate
is 3 x accounting's forward ``flops_per_token`` (forward + backward = 3 forwards) x tokens per
second of a full training step (forward, loss, backward, AdamW). Peak and model runs alternate
inside one process and each repetition gives one fraction, so drifting machine load cancels;
the table shows the medians.

    python benchmarks/bench_flops.py --pattern "(AF)*6" --shape 10m --out results.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from hcomposer import Architecture, build_model, count_costs
from hcomposer.shapes import resolve_shape

__all__ = ["main", "matmul_rate", "training_rate"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_rate(n: int, dtype: torch.dtype, iters: int = 3) -> float:
    """FLOP/s of the best of ``iters`` n x n x n matmuls."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: allocation, kernel choice
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def training_rate(model, tokens, targets, dtype: str):
    """A closure running one training step; returns seconds per step."""
    opt = torch.optim.AdamW(model.parameters())
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else nullcontext

    def step() -> float:
        t0 = time.perf_counter()
        with ctx():
            logits = model(tokens)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pattern", default="(AF)*6")
    p.add_argument("--shape", default="10m")
    p.add_argument("--vocab", type=int, default=8192, help="override the shape's vocab (0: keep)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(_DTYPES))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = resolve_shape(args.shape)
    if args.vocab:
        shape = shape.replace(vocab_size=args.vocab)
    arch = Architecture.parse(args.pattern, shape=shape)
    costs = count_costs(arch, seq_len=args.seq_len)
    train_flops_per_token = 3.0 * costs.flops_per_token
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, shape.vocab_size, (args.batch, args.seq_len + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    n_tok = x.numel()
    rows = []
    for dtype in args.dtype:
        model = build_model(arch, seed=0)
        step = training_rate(model, x, y, dtype)
        step()  # warm-up
        peaks, rates, fractions = [], [], []
        for _ in range(args.reps):
            peak = matmul_rate(args.matmul_size, _DTYPES[dtype])
            rate = train_flops_per_token * n_tok / step()
            peaks.append(peak)
            rates.append(rate)
            fractions.append(rate / peak)
        row = (dtype, statistics.median(peaks), statistics.median(rates), fractions)
        rows.append(row)
        print(
            f"{dtype}: matmul peak {row[1] / 1e9:.1f} GFLOP/s, model {row[2] / 1e9:.1f} GFLOP/s, "
            f"fraction {statistics.median(fractions):.3f} "
            f"({min(fractions):.3f}-{max(fractions):.3f})",
            flush=True,
        )
    lines = [
        f"Training FLOP/s of `{args.pattern}` on `{shape.name}` (vocab {shape.vocab_size}, "
        f"{costs.params_total / 1e6:.2f}M params, {costs.flops_per_token / 1e6:.2f} MFLOP/token "
        f"forward at T={args.seq_len}), batch {args.batch}, {torch.get_num_threads()} threads; "
        f"peak = best {args.matmul_size}^3 matmul; medians of {args.reps} interleaved reps.",
        "",
        "| dtype | matmul peak GFLOP/s | model GFLOP/s (3 x fwd) | fraction of peak | range |",
        "|---|---|---|---|---|",
    ]
    for dtype, peak, rate, fr in rows:
        lines.append(
            f"| {dtype} | {peak / 1e9:.1f} | {rate / 1e9:.1f} | {statistics.median(fr):.3f} | "
            f"{min(fr):.3f}-{max(fr):.3f} |"
        )
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
