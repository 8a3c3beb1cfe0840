"""hcomposer scale: extrapolate a searched block to a depth or a parameter count."""

from __future__ import annotations

import json

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.commands.options import add_output
from hcomposer.errors import UserError
from hcomposer.format import console, human, parse_count
from hcomposer.guards import check_cap
from hcomposer.pattern import canonical
from hcomposer.scaling.extrapolate import extrapolate, runs, scale_to_params
from hcomposer.shapes import resolve_shape

HELP = "Extrapolate a pattern to N sublayers or N parameters by stacking or stretching."

__all__ = ["HELP", "add_arguments", "run"]


def add_arguments(p) -> None:
    p.add_argument("pattern", help="the searched block, e.g. AAFFFF")
    p.add_argument("--layers", default=None, help="target number of sublayers")
    p.add_argument("--params", default=None, help="target total parameters, e.g. 1.2B, 350M, 1e9")
    p.add_argument(
        "--strategy",
        choices=["stack", "stretch"],
        default="stack",
        help="stack: repeat the block, stretch the remainder (default); "
        "stretch: scale every run of one primitive",
    )
    p.add_argument(
        "--shape", default="llama-3.2-1b", help="target shape preset or JSON (default llama-3.2-1b)"
    )
    add_output(p, None)


def _layers_arg(text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise UserError(f"--layers {text!r} is not a whole number of sublayers") from None
    if value < 1:
        raise UserError(f"--layers must be at least 1 (got {value})")
    return check_cap("sublayers", value, "--layers")


def run(args) -> int:
    if (args.layers is None) == (args.params is None):
        raise UserError("give exactly one of --layers N or --params N")
    block = canonical(args.pattern)
    shape = resolve_shape(args.shape)
    if args.layers is not None:
        arch = Architecture(
            pattern=extrapolate(block, _layers_arg(args.layers), args.strategy), shape=shape
        )
        target = None
    else:
        target = parse_count(args.params, "--params")
        if target < 1:
            raise UserError(f"--params must be positive (got {args.params!r})")
        # The depth scan is linear in the depth: refuse a target deeper than the cap up front.
        one = count_costs(Architecture(pattern=block, shape=shape))
        per_sublayer = max(one.params_non_embedding / one.n_sublayers, 1.0)
        depth = int((target - one.params_embedding) / per_sublayer)
        check_cap("sublayers", depth, f"--params {args.params} (about {depth:,} sublayers):")
        arch = scale_to_params(block, target, shape, args.strategy)
    costs = count_costs(arch)
    result = {
        "pattern": arch.pattern,
        "block": block,
        "strategy": args.strategy,
        "n_sublayers": arch.n_sublayers,
        "params_total": costs.params_total,
        "params_target": target,
        "params_non_embedding": costs.params_non_embedding,
        "counts": costs.counts,
        "runs": [[k[0] if len(k) == 1 else list(k), n] for k, n in runs(arch.pattern)],
        "shape": shape.name,
        "architecture": arch.to_dict(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    con = console()
    what = f"{target:,} parameters" if target else f"{arch.n_sublayers} sublayers"
    con.print(f"{block} -> {what} by {args.strategy} at shape {shape.name}")
    counts = ", ".join(f"{k}:{n}" for k, n in costs.counts.items())
    con.print(
        f"{arch.n_sublayers} sublayers ({counts}), {costs.params_total:,} parameters "
        f"({human(costs.params_total)})"
    )
    print(arch.pattern)
    return 0
