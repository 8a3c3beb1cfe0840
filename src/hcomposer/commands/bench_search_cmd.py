"""hcomposer bench-search: replay the samplers against a table of every pattern's score."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from rich.progress import Progress

from hcomposer.commands.options import add_output
from hcomposer.errors import UserError
from hcomposer.format import console
from hcomposer.guards import check_output_dir
from hcomposer.io import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    run_metadata,
)
from hcomposer.runs import BenchSearchDir
from hcomposer.search.samplers import SAMPLERS, default_n_startup
from hcomposer.search.space import SearchConfig
from hcomposer.search.tabular import Replay, bench, load_table, table_digest
from hcomposer.search.tabular_report import markdown_report, plot_regret, summarise

HELP = "Compare search samplers on a precomputed table of scores (no training)."

__all__ = ["HELP", "add_arguments", "run"]


def add_arguments(p) -> None:
    p.add_argument(
        "--table",
        default="af6q",
        help="a committed table (af6q: all 64 six-position A/F patterns on the calibrated "
        "proxy, 3 seeds; afs4q: all 81 four-position A/F/S patterns, 2 seeds; af6: the 64 "
        "A/F patterns on the old 20-step proxy, 1 seed, kept for the record), "
        "synthetic[:CHOICES:N:SEED], or a table JSON path (default af6q)",
    )
    p.add_argument(
        "--seeds", type=int, default=100, help="replays (seeds) per sampler (default 100)"
    )
    p.add_argument(
        "--samplers", default="gp,tpe,random,evolution", help="comma-separated sampler names"
    )
    p.add_argument("--budget", type=int, default=64, help="trials per replay (default 64)")
    p.add_argument(
        "--n-startup",
        type=int,
        default=None,
        help="initial random trials of gp/tpe (default: what 'search' uses for this budget)",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="replay in N processes (same results; default 1)"
    )
    p.add_argument(
        "--out",
        default=None,
        help="folder for results.json, report.md, regret.png and replays.jsonl, the log a "
        "killed run resumes from (default: none)",
    )
    add_output(p, None)


def option_fields() -> dict:
    """argparse dest -> (config class, field): each option is checked against the field."""
    return {"n_startup": (SearchConfig, "n_startup"), "workers": (SearchConfig, "workers")}


def _finished_replays(log: Path, settings: dict, names: list[str], seeds: list[int]) -> list:
    """Replays a killed run with the same settings already logged (those asked for again).

    A log made with another table, budget or start-up count is refused: its replays are not
    comparable, and appending to it would mix two benchmarks in one file.
    """

    want = {(n, s) for n in names for s in seeds}
    finished = {}
    for rec in read_jsonl(log):
        have = rec.get("settings")
        if have != settings:
            diff = sorted(
                k for k in settings if not isinstance(have, dict) or have.get(k) != settings[k]
            )
            raise UserError(
                f"--out {log.parent} holds replays made with other settings "
                f"({', '.join(diff) or 'unreadable'}); give a new --out, or the same --table, "
                "--budget and --n-startup to resume it"
            )
        try:
            r = Replay.from_dict(rec["replay"])
        except (KeyError, TypeError) as e:
            raise UserError(f"{log}: a line is not a replay ({e}); move the file away") from None
        if (r.sampler, r.seed) in want:
            finished[(r.sampler, r.seed)] = r
    return list(finished.values())


def _check(args) -> list[str]:
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1 (got {args.seeds})")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1 (got {args.workers})")
    if args.budget < 1:
        raise UserError(f"--budget must be at least 1 (got {args.budget})")
    if args.n_startup is not None and args.n_startup < 1:
        raise UserError(f"--n-startup must be at least 1 (got {args.n_startup})")
    names = [s.strip() for s in args.samplers.split(",") if s.strip()]
    bad = [s for s in names if s not in SAMPLERS]
    if bad or not names:
        raise UserError(
            f"--samplers {args.samplers!r}: unknown {', '.join(bad) or 'empty list'}; "
            f"choose from {', '.join(SAMPLERS)}"
        )
    if args.out is not None:
        check_output_dir(args.out, "--out")
    return list(dict.fromkeys(names))


def run(args) -> int:
    names = _check(args)
    table = load_table(args.table)
    n_startup = args.n_startup if args.n_startup is not None else default_n_startup(args.budget)
    command = shlex.join(args.argv) if getattr(args, "argv", None) else "hcomposer bench-search"
    seeds = list(range(args.seeds))
    settings = {
        "table": table.name,
        "table_digest": table_digest(table),
        "budget": args.budget,
        "n_startup": n_startup,
    }
    log = BenchSearchDir(args.out).replays if args.out is not None else None
    finished = _finished_replays(log, settings, names, seeds) if log is not None else []
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with Progress(console=console(), transient=True) as bar:
        task = bar.add_task("replaying", total=len(names) * len(seeds), completed=len(finished))

        def tick(r) -> None:
            if log is not None:
                append_jsonl(log, {"settings": settings, "replay": r.to_dict()})
            bar.update(task, advance=1, description=f"{r.sampler} seed {r.seed}")

        results = bench(
            table,
            names,
            seeds,
            args.budget,
            n_startup,
            on_replay=tick,
            workers=args.workers,
            finished=finished,
        )
    wall = time.perf_counter() - start
    summary = summarise(results, args.budget)
    report = markdown_report(table, summary, args.budget, command)
    doc = {
        "table": table.name,
        "n_patterns": len(table.scores),
        "top1": sorted(table.top(1)),
        "top3": sorted(table.top(3)),
        "tied_with_best": sorted(table.tied()),
        "table_seeds": table.seeds,
        "budget": args.budget,
        "seeds": seeds,
        "n_startup": n_startup,
        "workers": args.workers,
        "resumed_replays": len(finished),
        "samplers": summary,
        "wall_seconds": wall,
        "command": command,
    }
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        full = {
            **doc,
            "replays": {k: [r.to_dict() for r in v] for k, v in results.items()},
            "metadata": run_metadata(getattr(args, "argv", [])),
        }
        d = BenchSearchDir(out)
        atomic_write_json(d.results, full)
        atomic_write_text(d.report, report)
        plot_regret(results, table, args.budget, d.regret_png)
        doc["files"] = [str(p) for p in (d.results, d.report, d.regret_png, d.replays)]
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(report)
    return 0
