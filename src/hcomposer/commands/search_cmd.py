"""hcomposer search: find the order and ratio of primitives with an Optuna sampler."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hcomposer.commands.options import add_output
from hcomposer.format import console, parse_count
from hcomposer.guards import check_output_dir
from hcomposer.recipes import get_recipe
from hcomposer.search.executors import make_executor
from hcomposer.search.loop import run_search
from hcomposer.search.space import SearchConfig
from hcomposer.tracking import add_report_to, parse_report_to

HELP = "Search the order and ratio of primitives (Bayesian optimisation by default); resumable."


def add_arguments(p) -> None:
    p.add_argument("--recipe", default=None, help="start from a named recipe (quickstart, paper)")
    p.add_argument(
        "--primitives",
        default=None,
        help="choices per position: tokens (AFS) or a comma list with groups (A,F,[A|S])",
    )
    p.add_argument("--layers", type=int, default=None, help="positions (sublayers) to search")
    p.add_argument("--trials", type=int, default=None, help="trained trials in total")
    p.add_argument("--sampler", default=None, help="gp (default), tpe, random, evolution")
    p.add_argument(
        "--strategy", default=None, help="one-shot (default), end-incremental, middle-incremental"
    )
    p.add_argument(
        "--stage-size",
        type=int,
        default=None,
        help="positions searched per stage of an incremental strategy (default layers/2)",
    )
    p.add_argument("--proxy", default=None, help="mad (default), mad:TASK[,TASK], mqar, text")
    p.add_argument(
        "--objective",
        default=None,
        help="score, or score plus a cost: score,kv | score,flops | score,throughput",
    )
    p.add_argument(
        "--shape", default=None, help="search shape: preset or JSON file (default proxy)"
    )
    p.add_argument(
        "--max-params", default=None, help="parameter budget at the search shape (e.g. 1.5M)"
    )
    p.add_argument("--max-kv-bytes", default=None, help="KV-cache budget in bytes per token")
    p.add_argument(
        "--min-count",
        action="append",
        default=None,
        metavar="TOKEN=N",
        help="at least N sublayers of TOKEN (repeatable, e.g. --min-count A=1)",
    )
    p.add_argument(
        "--max-count",
        action="append",
        default=None,
        metavar="TOKEN=N",
        help="at most N sublayers of TOKEN (repeatable)",
    )
    p.add_argument("--n-startup", type=int, default=None, help="initial random trials of gp/tpe")
    p.add_argument(
        "--pruner",
        default=None,
        help="stop weak trials after a task: none (default), median, hyperband",
    )
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default 1)")
    p.add_argument(
        "--executor",
        default="local",
        help="where trials are evaluated: local (default, --workers processes) or ray",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join: auto or HOST:PORT (default: local)",
    )
    p.add_argument("--cpus-per-trial", type=float, default=None, help="Ray CPUs per trial (1)")
    p.add_argument("--gpus-per-trial", type=float, default=None, help="Ray GPUs per trial (0)")
    p.add_argument(
        "--storage",
        default=None,
        help="SQLAlchemy URL or journal:PATH (default: sqlite in the --out folder)",
    )
    p.add_argument("--out", default=None, help="run folder (default runs/search-<sampler>-<seed>)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler and the proxy")
    add_report_to(p)
    add_output(p, "no live view on stderr")


def option_fields() -> dict:
    """argparse dest -> (config class, field): each option is checked against the field."""
    names = "layers trials sampler strategy stage_size n_startup pruner workers seed"
    return {name: (SearchConfig, name) for name in names.split()}


_FIELDS = {
    "primitives": "primitives",
    "layers": "layers",
    "trials": "trials",
    "sampler": "sampler",
    "strategy": "strategy",
    "stage_size": "stage_size",
    "proxy": "proxy",
    "objective": "objective",
    "shape": "shape",
    "min_count": "min_count",
    "max_count": "max_count",
    "n_startup": "n_startup",
    "pruner": "pruner",
    "workers": "workers",
    "storage": "storage",
    "seed": "seed",
}


def build_config(args: argparse.Namespace):
    """The SearchConfig of a command line: a recipe (or the defaults) plus the flags."""
    base = get_recipe(args.recipe).search if args.recipe else SearchConfig()
    changes = {}
    for attr, name in _FIELDS.items():
        value = getattr(args, attr)
        if value is not None:
            changes[name] = value
    if args.max_params is not None:
        changes["max_params"] = parse_count(args.max_params, "--max-params")
    if args.max_kv_bytes is not None:
        changes["max_kv_bytes"] = parse_count(args.max_kv_bytes, "--max-kv-bytes")
    return base.replace(**changes) if changes else base


def _table(result) -> None:
    from rich.table import Table

    con = console()
    done = sorted(
        (t for t in result.trials if t["state"] == "COMPLETE" and t["score"] is not None),
        key=lambda t: -t["score"],
    )
    objectives = result.config.objective
    table = Table(title=f"top trials ({len(done)} trained) — {result.out_dir}")
    for col in ("#", "stage", "pattern", *objectives, "params", "s"):
        table.add_column(col, justify="left" if col == "pattern" else "right")
    for t in done[:10]:
        vals = [f"{t['values'][o]:.4g}" for o in objectives]
        table.add_row(
            str(t["number"]),
            str(t["stage"] + 1),
            t["pattern"],
            *vals,
            f"{t['cost']['params_total']:,}",
            f"{t['wall_seconds'] or 0:.1f}",
        )
    con.print(table)
    best = result.best
    if isinstance(best, list):
        con.print("Pareto front: " + ", ".join(f"{b['pattern']} ({b['score']:.4f})" for b in best))
    elif best:
        pattern, score, number = best["pattern"], best["score"], best["number"]
        con.print(f"best: [bold]{pattern}[/bold] score {score:.4f} (trial {number})")
    for note in result.notes:
        con.print(f"note: {note}")


def run(args) -> int:
    config = build_config(args)
    out = Path(args.out) if args.out else Path("runs") / f"search-{config.sampler}-{config.seed}"
    check_output_dir(out, "--out")
    report_to = parse_report_to(args.report_to)
    executor = make_executor(
        args.executor,
        ray_address=args.ray_address,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
    )
    result = run_search(
        config, out, argv=args.argv, progress=not args.no_progress, executor=executor,
        report_to=report_to,
    )  # fmt: skip
    if args.json:
        data = result.to_dict()
        print(json.dumps(data, indent=2))
    else:
        _table(result)
    return 0
