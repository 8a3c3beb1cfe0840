"""hcomposer eval: evaluate a trained run folder (loss, MAD, MQAR, NIAH, efficiency, lm-eval)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hcomposer.accounting import estimate_memory
from hcomposer.architecture import Architecture
from hcomposer.commands.options import add_data, add_output, int_list
from hcomposer.errors import UserError
from hcomposer.evaluation.mqar_curve import MQARCurveConfig
from hcomposer.evaluation.niah import NIAHConfig
from hcomposer.evaluation.suite import parse_suite, run_suite
from hcomposer.guards import check_memory, check_output_dir
from hcomposer.recipes import EvalConfig
from hcomposer.runs import RunDir

HELP = "Evaluate a run folder: --suite loss,mad,mqar,niah,efficiency,lm-eval:TASKS."


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="DIR", help="run folder written by `hcomposer train`")
    p.add_argument(
        "--suite",
        required=True,
        help="comma-separated parts: loss, mad, mqar, niah, efficiency, lm-eval:TASK[,TASK]",
    )
    add_data(p, default="the run's data", what="text for `loss`")
    p.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: documents per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")
    p.add_argument("--niah-lengths", default=None, help="comma-separated token lengths")
    p.add_argument("--niah-trials", type=int, default=3, help="trials per (length, depth)")
    p.add_argument("--mqar-lengths", default="64,128,256", help="comma-separated lengths")
    p.add_argument("--mqar-steps", type=int, default=200, help="training steps per length")
    p.add_argument("--mqar-shape", default="proxy", help="shape of the fresh MQAR copies, or 'run'")
    p.add_argument("--max-len", type=int, default=None, help="efficiency: longest context")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    add_output(p, None)


def option_fields() -> dict:
    """argparse dest -> (config class, field): each option is checked against the field."""
    return {
        "niah_trials": (NIAHConfig, "trials"),
        "mqar_steps": (MQARCurveConfig, "steps"),
        "num_fewshot": (EvalConfig, "lm_eval_fewshot"),
    }


def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    return None if text is None else int_list(text, flag, least=1)


def _check_lengths(run_dir: Path, parts, options: dict, max_len: int | None) -> None:
    """Refuse context lengths the machine cannot hold, before the run is loaded."""
    names = {name for name, _ in parts}
    asked = [("--niah-lengths", n) for n in options["niah"].get("lengths") or () if "niah" in names]
    asked += [("--mqar-lengths", n) for n in options["mqar"]["lengths"] or () if "mqar" in names]
    if max_len is not None and "efficiency" in names:
        asked.append(("--max-len", max_len))
    if not asked or not RunDir(run_dir).architecture.is_file():
        return
    arch = Architecture.from_json(RunDir(run_dir).architecture)
    flag, longest = max(asked, key=lambda a: a[1])
    check_memory(estimate_memory(arch, batch=1, seq_len=longest), f"{flag} {longest:,}")


def run(args) -> int:
    parts = parse_suite(args.suite)  # unknown names fail before the run is loaded
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {str(run_dir)!r} does not exist")
    check_output_dir(run_dir / "eval", "the run's eval folder")
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    options = {
        "niah": {"trials": args.niah_trials},
        "mqar": {
            "lengths": _ints(args.mqar_lengths, "--mqar-lengths"),
            "steps": args.mqar_steps,
            "shape": None if args.mqar_shape == "run" else args.mqar_shape,
        },
        "efficiency": {"device": args.device, "max_len": args.max_len},
        "lm_eval": {"num_fewshot": args.num_fewshot},
    }
    if args.niah_lengths:
        options["niah"]["lengths"] = _ints(args.niah_lengths, "--niah-lengths")
    _check_lengths(run_dir, parts, options, args.max_len)
    res = run_suite(
        run_dir, parts, data=args.data, include_path=args.include_path, limit=limit,
        device=args.device, options=options, argv=args.argv, progress=not args.json,
    )  # fmt: skip
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        report = RunDir(run_dir).eval_markdown
        print(f"results: {report}", file=sys.stderr)
        print(report.read_text())
    return 0
