"""hcomposer compare: trained runs side by side, with ratios to the first."""

from __future__ import annotations

import json
from pathlib import Path

from hcomposer.commands.options import add_output
from hcomposer.errors import UserError
from hcomposer.evaluation.efficiency import EfficiencyConfig
from hcomposer.evaluation.efficiency_compare import measure_runs_interleaved
from hcomposer.format import console
from hcomposer.guards import check_output_dir
from hcomposer.reporting.compare import compare_runs
from hcomposer.runs import RunDir

HELP = "Compare trained run folders (the first is the reference) into a Markdown report."


def add_arguments(p) -> None:
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run folders from hcomposer train")
    p.add_argument("--out", required=True, help="folder for compare.md, compare.json, plots")
    p.add_argument("--labels", default=None, help="comma-separated names, one per DIR")
    add_output(p, None)
    p.add_argument(
        "--interleaved",
        action="store_true",
        help="re-measure efficiency of all runs in turn in this process (paired ratios)",
    )
    p.add_argument("--max-len", type=int, default=None, help="--interleaved: longest context")


def run(args) -> int:
    for d in args.dirs:
        RunDir(d).require_run()
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.dirs):
        raise UserError(f"--labels has {len(labels)} names for {len(args.dirs)} folders")
    if args.max_len is not None and not args.interleaved:
        raise UserError("--max-len only applies with --interleaved")
    if args.max_len is not None and args.max_len < 2:
        raise UserError(f"--max-len must be at least 2 tokens (got {args.max_len})")
    out = check_output_dir(args.out, "--out")
    eff = None
    if args.interleaved:
        cfg = EfficiencyConfig(max_len=args.max_len)
        eff = measure_runs_interleaved(args.dirs, labels or [Path(d).name for d in args.dirs], cfg)
    result = compare_runs(args.dirs, out, labels, efficiency=eff)
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
