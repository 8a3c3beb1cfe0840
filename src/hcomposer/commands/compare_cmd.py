"""hcomposer compare: trained runs side by side, with ratios to the first."""

from __future__ import annotations

import json
from pathlib import Path

from hcomposer.errors import UserError
from hcomposer.format import console
from hcomposer.runs import RunDir

HELP = "Compare trained run folders (the first is the reference) into a Markdown report."


def add_arguments(p) -> None:
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run folders from hcomposer train")
    p.add_argument("--out", required=True, help="folder for compare.md, compare.json, plots")
    p.add_argument("--labels", default=None, help="comma-separated names, one per DIR")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def run(args) -> int:
    # Lazy (measured): at the top, every `--help` would import torch (0.15 s -> 3-9 s).
    from hcomposer.reporting.compare import compare_runs

    for d in args.dirs:
        RunDir(d).require_run()
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.dirs):
        raise UserError(f"--labels has {len(labels)} names for {len(args.dirs)} folders")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out!r} is a file; choose a folder")
    result = compare_runs(args.dirs, out, labels)
    if args.json:
        skip = ("table", "sections")
        print(json.dumps({k: v for k, v in result.items() if k not in skip}, default=str))
        return 0
    _print_table(result["table_header"], result["table"])
    console().print(f"report: {result['markdown']}")
    return 0


def _print_table(header, rows) -> None:
    from rich.table import Table

    t = Table(title="comparison")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    console().print(t)
