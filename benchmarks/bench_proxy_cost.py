"""Cost of the MAD proxy's defaults against the previous defaults, in one process.

For each pattern and seed, runs ``evaluate_proxy`` with the previous defaults (120 steps,
lrs 1e-3 and 3e-3, bf16, no early stop) and with today's defaults, for the full six-task
proxy and the quickstart's three-task subset, and records the process CPU time (one torch
thread: what the evaluation costs alone on one core, which other jobs on a shared machine
barely move), the score and the per-task accuracies and steps. Finished rows are cached in
``--out`` (JSON) and skipped when run again.

    python benchmarks/bench_proxy_cost.py --patterns AFAFAF,FFFFFF --seeds 0 \\
        --configs previous,default --out benchmarks/results/proxy_cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hcomposer.architecture import Architecture
from hcomposer.io import atomic_write_text
from hcomposer.proxies.proxy import QUICKSTART_PROXY, evaluate_proxy
from hcomposer.proxies.proxy_config import ProxyConfig

# The defaults before the calibration of 2026-12-01, on today's generators.
PREVIOUS = dict(steps=120, lrs=(1e-3, 3e-3), dtype="bf16", warmup_steps=10, check_every=0)


def _config(name: str) -> ProxyConfig:
    if name == "previous":
        from hcomposer.data.mad import MAD_TASKS, default_task_config

        old = {
            "in_context_recall": dict(seq_len=64),
            "fuzzy_in_context_recall": dict(seq_len=64),
            "noisy_in_context_recall": dict(seq_len=64),
            "selective_copying": dict(seq_len=64),
            "compression": dict(seq_len=32),
            "memorization": dict(vocab_size=256, seq_len=32, num_train_examples=256),
        }
        tasks = tuple(default_task_config(t, **old[t]) for t in MAD_TASKS)
        return ProxyConfig(**PREVIOUS, mad_tasks=tasks)
    if name == "default":
        return ProxyConfig()
    if name == "fp32-no-early-stop":
        return ProxyConfig(check_every=0)
    raise SystemExit(f"unknown config {name!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patterns", default="AFAFAF")
    p.add_argument("--seeds", default="0")
    p.add_argument("--configs", default="previous,default")
    # Proxies are separated by ";": a proxy such as the quickstart's has commas in it.
    p.add_argument("--proxies", default=f"mad;{QUICKSTART_PROXY}")
    p.add_argument("--shape", default="proxy")
    p.add_argument("--out", type=Path, default=Path("proxy_cost.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    state = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": {}}
    for proxy in args.proxies.split(";"):
        for name in args.configs.split(","):
            for pattern in args.patterns.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    key = f"{proxy}|{name}|{pattern}|{seed}"
                    if key in state["rows"]:
                        continue
                    arch = Architecture.parse(pattern, args.shape)
                    cpu0 = time.process_time()
                    r = evaluate_proxy(arch, proxy, seed=seed, config=_config(name))
                    row = {
                        "cpu_s": round(time.process_time() - cpu0, 1),
                        "score": round(r.score, 4),
                        "tasks": {
                            k: [round(v["accuracy"], 3), sum(g["steps"] for g in v["grid"])]
                            for k, v in r.tasks.items()
                        },
                        # per task: seconds of training and scoring (one thread, wall clock)
                        "task_s": {
                            k: round(sum(g["seconds"] for g in v["grid"]), 1)
                            for k, v in r.tasks.items()
                        },
                        "tokens": r.tokens,
                    }
                    state["rows"][key] = row
                    atomic_write_text(args.out, json.dumps(state, indent=1))
                    print(key, json.dumps(row), flush=True)
    print("| proxy | config | pattern | seed | CPU s | score | per task (accuracy, steps) |")
    print("|---|---|---|---|---|---|---|")
    for key, row in state["rows"].items():
        proxy, name, pattern, seed = key.split("|")
        tasks = ", ".join(f"{k} {a} ({s})" for k, (a, s) in row["tasks"].items())
        print(
            f"| {proxy} | {name} | {pattern} | {seed} | {row['cpu_s']} | {row['score']} | {tasks} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
