"""What ``--pruner`` saves and whether it changes the search's answer, at no training cost.

The proxy is replayed from the committed ``af6`` table (64 A/F patterns of 6 sublayers,
scored on MAD recall then memorisation): a fake objective reports each pattern's recorded
per-task accuracies through the same ``report(step, value)`` hook as ``evaluate_proxy``
(after task k, the mean of the first k tasks) and raises ``ProxyPruned`` when told to stop
before the last task.
Every search runs the real engine (Optuna storage, sampler, pruner, trial steps) on fixed
seeds; only the training is replaced by the table.

Recorded per pruner and seed: tasks evaluated (a full trial costs 2), trials pruned, the best
pattern found and its rank in the table, and whether it is the one the same search without a
pruner finds.

    PYTHONPATH=src python benchmarks/bench_pruner.py --seeds 0 1 2 --trials 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hcomposer.io import atomic_write_json
from hcomposer.proxies.proxy import ProxyPruned
from hcomposer.search import SearchConfig, load_trials, run_search

TABLE = Path(__file__).resolve().parents[1] / "src/hcomposer/assets/tabular/af6.json"
TASKS = ("in_context_recall", "memorization")  # the order the table's proxy ran them


class TableProxy:
    """A picklable objective replaying the table; counts the tasks it 'evaluates'."""

    def __init__(self, task_accuracy: dict[str, dict[str, float]]):
        self.acc = task_accuracy
        self.tasks_run = 0

    def __call__(self, arch, proxy, seed, report=None):
        vals = [self.acc[arch.pattern][t] for t in TASKS]
        for k in range(1, len(vals) + 1):
            self.tasks_run += 1
            value = sum(vals[:k]) / k
            if report is not None and report(k, value) and k < len(vals):
                raise ProxyPruned(k, value)
        return {"score": sum(vals) / len(vals)}


def one_search(table: dict, pruner: str, seed: int, trials: int, sampler: str) -> dict:
    proxy = TableProxy(table["task_accuracy"])
    cfg = SearchConfig(
        primitives=("A", "F"),
        layers=6,
        trials=trials,
        sampler=sampler,
        proxy="synthetic",  # stands for the table proxy injected below
        shape="proxy",
        seed=seed,
        pruner=pruner,
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.process_time()
        result = run_search(cfg, Path(tmp) / "s", objective=proxy, progress=False)
        cpu = time.process_time() - t0
        recs = load_trials(Path(tmp) / "s")
    ranked = sorted(table["scores"], key=lambda p: -table["scores"][p])
    best = result.best["pattern"]
    return {
        "pruner": pruner,
        "seed": seed,
        "tasks": proxy.tasks_run,
        "trained": sum(r["state"] in ("COMPLETE", "PRUNED") and not r["cached_from"] for r in recs),
        "pruned": sum(r["state"] == "PRUNED" and not r["cached_from"] for r in recs),
        "best": best,
        "best_rank": ranked.index(best) + 1,
        "search_cpu_s": round(cpu, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--samplers", nargs="+", default=["gp", "tpe"])
    ap.add_argument("--pruners", nargs="+", default=["none", "median", "hyperband"])
    ap.add_argument("--out", default="benchmarks/results/pruner.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    table = json.loads(TABLE.read_text())
    rows = []
    for sampler in args.samplers:
        for seed in args.seeds:
            ref = None
            for pruner in args.pruners:
                r = {"sampler": sampler, **one_search(table, pruner, seed, args.trials, sampler)}
                if pruner == "none":
                    ref = r
                r["same_best_as_none"] = None if ref is None else r["best"] == ref["best"]
                r["tasks_saved_vs_none"] = None if ref is None else 1 - r["tasks"] / ref["tasks"]
                rows.append(r)
                print(json.dumps(r), file=sys.stderr)
    summary = {}
    for sampler, pruner in ((s, p) for s in args.samplers for p in args.pruners):
        rs = [r for r in rows if r["pruner"] == pruner and r["sampler"] == sampler]
        saved = [r["tasks_saved_vs_none"] for r in rs if r["tasks_saved_vs_none"] is not None]
        summary[f"{sampler} {pruner}"] = {
            "tasks_mean": statistics.fmean(r["tasks"] for r in rs),
            "saved_mean": statistics.fmean(saved) if saved else None,
            "saved_std": statistics.stdev(saved) if len(saved) > 1 else None,
            "same_best": sum(bool(r["same_best_as_none"]) for r in rs),
            "best_rank_mean": statistics.fmean(r["best_rank"] for r in rs),
            "trained_mean": statistics.fmean(r["trained"] for r in rs),
            "n": len(rs),
        }
    doc = {"command": " ".join(["python", *sys.argv]), "trials": args.trials,
           "rows": rows, "summary": summary}  # fmt: skip
    atomic_write_json(Path(args.out), doc)
    print(
        "| sampler pruner | trials trained (mean) | tasks run (mean) | tasks saved vs none "
        "(mean ± std over seeds) | best = no-pruner best | rank of best in table (mean) |"
    )
    print("|---|---|---|---|---|---|")
    for p, s in summary.items():
        saved = "—" if s["saved_mean"] is None else f"{100 * s['saved_mean']:.1f}%"
        if s["saved_std"] is not None:
            saved += f" ± {100 * s['saved_std']:.1f}%"
        print(f"| {p} | {s['trained_mean']:.1f} | {s['tasks_mean']:.1f} | {saved} "
              f"| {s['same_best']}/{s['n']} "
              f"| {s['best_rank_mean']:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
