"""Training throughput (tokens/s) of hybrids against the ``(AF)*n`` baseline, in one process.

Each step is what ``hcomposer.training`` does: autocast forward (bf16) or plain fp32, fp32 cross
entropy, backward, gradient clipping, AdamW step. The patterns are measured in turns
(round-robin, ``--rounds`` times) so that load from other processes spreads over all of them;
the median step time of each is reported, with its ratio to the baseline's.

    python benchmarks/bench_train.py --shape 10m --seq-len 256 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from hcomposer.architecture import Architecture
from hcomposer.data import ByteTokenizer, prepare_dataset
from hcomposer.model import build_model
from hcomposer.training import resolve_arch
from hcomposer.training.step import autocast, param_groups

PATTERNS = [
    "(AF)*12",
    "(SF)*12",
    "(AFSF)*6",
    "(WFWFWFAF)*3",
    "(AFAE)*6",
    "(AE)*12",
    "([A|S]F)*12",
]


def _stepper(pattern: str, shape: str, dtype: str, batch: int, seq_len: int, dataset):
    arch = resolve_arch(Architecture.parse(pattern, shape=shape), ByteTokenizer(), seq_len)
    model = build_model(arch, seed=0)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    device = torch.device("cpu")
    step = [0]

    def run_step() -> float:
        x, y = dataset.batch_at("train", step[0], batch, seq_len)
        step[0] += 1
        t0 = time.perf_counter()
        with autocast(device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    params = sum(p.numel() for p in model.parameters())
    return run_step, params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="10m")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="timed steps per pattern and dtype")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dataset = prepare_dataset(None, ByteTokenizer())
    patterns = args.patterns.split(",")
    results = []
    for dtype in args.dtypes.split(","):
        steppers = {}
        for p in patterns:
            fn, params = _stepper(p, args.shape, dtype, args.batch_size, args.seq_len, dataset)
            fn()  # warm-up step: allocations, first-call overheads
            steppers[p] = (fn, params)
        times: dict[str, list[float]] = {p: [] for p in patterns}
        for _ in range(args.rounds):
            for p in patterns:
                times[p].append(steppers[p][0]())
        tokens = args.batch_size * args.seq_len
        base = tokens / statistics.median(times[patterns[0]])
        for p in patterns:
            tps = tokens / statistics.median(times[p])
            results.append(
                {
                    "pattern": p,
                    "dtype": dtype,
                    "params": steppers[p][1],
                    "tokens_per_s": tps,
                    "ratio": tps / base,
                }
            )
            print(f"{dtype} {p:>16} {tps:10.0f} tok/s  x{tps / base:.2f}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "config": vars(args),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "results": results,
                },
                indent=2,
            )
        )
    else:
        print(f"| pattern | dtype | params | tokens/s | vs {patterns[0]} |")
        print("|---|---|---:|---:|---:|")
        for r in results:
            print(
                f"| `{r['pattern']}` | {r['dtype']} | {r['params'] / 1e6:.2f}M | "
                f"{r['tokens_per_s']:,.0f} | {r['ratio']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
