"""Calibrate the MAD proxy: accuracy against training steps, per task, per pattern.

Each cell trains one model (one pattern, one task difficulty, one learning rate, one seed)
for up to ``--steps`` AdamW steps and measures the validation accuracy every
``--check-every`` steps, the test accuracy at the end, and the process CPU time (one torch
thread). A run stops early once it reaches ``--solved`` validation accuracy. Finished cells
are cached in the ``--out`` JSON file and skipped when the command is run again, so an
interrupted calibration resumes. ``--plot`` draws the curves (mean over seeds) of every
cell in the given JSON files into one PNG.

    python benchmarks/calibrate_proxy.py --patterns AFAFAF,FFFFFF,SFSFSF \\
        --tasks in_context_recall --lrs 1e-3,3e-3 --seeds 0 --steps 1000 --out cal.json
    python benchmarks/calibrate_proxy.py --plot cal.png --out cal.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hcomposer.architecture import Architecture
from hcomposer.data.mad import default_task_config, generate_task
from hcomposer.io import atomic_write_text
from hcomposer.proxies.proxy_config import ProxyConfig
from hcomposer.proxies.task import TaskHooks, TaskRun, train_and_score


def _cell_key(cell: dict) -> str:
    return json.dumps(cell, sort_keys=True)


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"cells": {}}


def run_cell(cell: dict) -> dict:
    """Train one cell; returns its curve, test accuracy and CPU seconds."""
    arch = Architecture.parse(cell["pattern"], cell["shape"])
    if cell.get("shape_changes"):
        arch = arch.with_shape(arch.shape.replace(**cell["shape_changes"]))
    task = default_task_config(cell["task"], **cell.get("task_changes", {}))
    data = generate_task(task, cell["seed"])
    solved = cell["solved"]
    cpu0 = time.process_time()
    run = train_and_score(
        arch,
        data,
        TaskRun(
            lr=cell["lr"],
            weight_decay=cell.get("weight_decay", 0.0),
            steps=cell["steps"],
            batch_size=cell["batch_size"],
            warmup_steps=cell["warmup_steps"],
            grad_clip=1.0,
            dtype=cell.get("dtype", "fp32"),
            schedule=cell.get("schedule", "cosine"),
            seed=cell["seed"] * 1000,
            check_every=cell["check_every"],
        ),
        hooks=TaskHooks(
            on_check=lambda step, acc: _progress(cell, step, acc, cpu0) or acc >= solved
        ),
    )
    return {
        "curve": run.curve,
        "test_accuracy": run.accuracy,
        "val_accuracy": run.val_accuracy,
        "steps_done": run.steps_done,
        "cpu_s": round(time.process_time() - cpu0, 2),
        "failure": run.failure,
    }


def _progress(cell: dict, step: int, acc: float, cpu0: float) -> None:
    cpu = time.process_time() - cpu0
    print(
        f"  {cell['task']} {cell['pattern']} lr={cell['lr']:g} seed={cell['seed']} "
        f"{cell.get('label', '')}: step {step} val {acc:.3f} cpu {cpu:.1f}s",
        file=sys.stderr,
        flush=True,
    )


def plot(paths: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = []
    for p in paths:
        stored = _load(p)["cells"]
        if isinstance(stored, list):  # curve records: {task, pattern, lr, label, curve}
            cells += [(c, {"curve": [pt[:2] for pt in c["curve"]]}) for c in stored]
            continue
        for key, res in stored.items():
            cells.append((json.loads(key), res))
    tasks = sorted({c["task"] for c, _ in cells})
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(tasks) :]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks):
        groups: dict[str, list] = {}
        for c, r in cells:
            if c["task"] != task:
                continue
            label = f"{c['pattern']} lr={c['lr']:g} {c.get('label', '')}".strip()
            groups.setdefault(label, []).append(r)
        for label, rs in sorted(groups.items()):
            # mean over seeds at the checks every run reached (solved runs hold their value)
            steps = sorted({s for r in rs for s, _ in r["curve"]})
            ys = []
            for s in steps:
                vals = []
                for r in rs:
                    before = [a for t, a in r["curve"] if t <= s]
                    vals.append(before[-1] if before else 0.0)
                ys.append(sum(vals) / len(vals))
            ax.plot(steps, ys, label=f"{label} (n={len(rs)})")
        ax.set_title(task)
        ax.set_xlabel("training steps")
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patterns", default="AFAFAF,FFFFFF,SFSFSF")
    p.add_argument("--tasks", default="in_context_recall")
    p.add_argument("--task-changes", default="{}", help="JSON: MADTaskConfig fields to set")
    p.add_argument("--shape", default="proxy")
    p.add_argument("--shape-changes", default="{}", help="JSON: Shape fields to set")
    p.add_argument("--lrs", default="1e-3,3e-3")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=ProxyConfig().batch_size)
    p.add_argument("--warmup", type=int, default=ProxyConfig().warmup_steps)
    p.add_argument("--check-every", type=int, default=50)
    p.add_argument("--schedule", default="cosine", help="cosine or wsd")
    p.add_argument("--solved", type=float, default=0.99)
    p.add_argument("--label", default="", help="legend suffix for this set of cells")
    p.add_argument("--out", type=Path, nargs="+", default=[Path("calibration.json")])
    p.add_argument("--plot", type=Path, default=None, help="draw the cells in --out, no runs")
    args = p.parse_args(argv)
    if args.plot is not None:
        plot(args.out, args.plot)
        return 0
    torch.set_num_threads(1)
    out = args.out[0]
    state = _load(out)
    for task in args.tasks.split(","):
        for pattern in args.patterns.split(","):
            for lr in (float(v) for v in args.lrs.split(",")):
                for seed in (int(v) for v in args.seeds.split(",")):
                    cell = {
                        "pattern": pattern,
                        "task": task,
                        "task_changes": json.loads(args.task_changes),
                        "shape": args.shape,
                        "shape_changes": json.loads(args.shape_changes),
                        "lr": lr,
                        "seed": seed,
                        "steps": args.steps,
                        "batch_size": args.batch_size,
                        "warmup_steps": args.warmup,
                        "check_every": args.check_every,
                        **({"schedule": args.schedule} if args.schedule != "cosine" else {}),
                        "solved": args.solved,
                        "label": args.label,
                    }
                    key = _cell_key(cell)
                    if key in state["cells"]:
                        continue
                    res = run_cell(cell)
                    # merge with cells other processes wrote meanwhile
                    state = _load(out)
                    state["cells"][key] = res
                    atomic_write_text(out, json.dumps(state, indent=1))
                    tail = [f"{s}:{a:.2f}" for s, a in res["curve"]]
                    print(
                        f"{task} {pattern} lr={lr:g} seed={seed} {args.label}: "
                        f"test {res['test_accuracy']:.3f} cpu {res['cpu_s']}s "
                        f"steps {res['steps_done']} | {' '.join(tail)}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
