"""Cost of one architecture's full MAD evaluation at the ``proxy`` shape, fp32 against bf16.

Runs ``evaluate_proxy(arch, "mad")`` with the default ``ProxyConfig`` once per dtype and
prints wall time, process CPU time (what the run would take alone on one core: the
machine this was written on was shared, so wall time is inflated by other jobs),
training tokens per second and the scores. ``--json`` prints one JSON document.

    python benchmarks/bench_mad.py --pattern AFAFAF --dtypes fp32,bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from hcomposer.architecture import Architecture
from hcomposer.proxies.proxy import evaluate_proxy
from hcomposer.proxies.proxy_config import ProxyConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pattern", default="AFAFAF")
    p.add_argument("--shape", default="proxy")
    p.add_argument("--proxy", default="mad")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    arch = Architecture.parse(args.pattern, args.shape)
    rows = []
    for dtype in args.dtypes.split(","):
        cfg = ProxyConfig(dtype=dtype)
        if args.steps:
            cfg = cfg.replace(steps=args.steps)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        r = evaluate_proxy(arch, args.proxy, seed=args.seed, config=cfg)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        row = {
            "pattern": arch.pattern,
            "shape": arch.shape.name,
            "dtype": dtype,
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "tokens": r.tokens,
            "tokens_per_cpu_s": round(r.tokens / cpu),
            "tokens_per_wall_s": round(r.tokens / wall),
            "score": round(r.score, 4),
            "tasks": {k: round(v["accuracy"], 3) for k, v in r.tasks.items()},
            "grid_runs": sum(len(v["grid"]) for v in r.tasks.values()),
            "failures": r.failures,
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("| pattern | dtype | wall s | CPU s | tokens | tokens/CPU-s | score | per task |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            tasks = ", ".join(f"{k} {v}" for k, v in r["tasks"].items())
            print(
                f"| {r['pattern']} | {r['dtype']} | {r['wall_s']} | {r['cpu_s']} | "
                f"{r['tokens']:,} | {r['tokens_per_cpu_s']:,} | {r['score']} | {tasks} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
