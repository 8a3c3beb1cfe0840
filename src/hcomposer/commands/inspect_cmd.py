"""hcomposer inspect: what a pattern costs, without building weights."""

from __future__ import annotations

import json

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.commands.options import add_output
from hcomposer.errors import PatternError
from hcomposer.format import console, human, human_bytes
from hcomposer.pattern import TOKENS, to_megatron
from hcomposer.shapes import Shape

HELP = "Show a pattern's parameters, FLOPs and cache sizes (no weights are built)."


def add_arguments(p) -> None:
    p.add_argument("pattern", help="pattern, e.g. '(AF)*16' or 'AF[A|S]F'")
    p.add_argument("--shape", default="proxy", help="preset name or JSON file (default: proxy)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs")
    add_output(p, None)


def option_fields() -> dict:
    """argparse dest -> (config class, field): each option is checked against the field."""
    # A sequence length of the FLOPs count: the range of the lengths a shape declares.
    return {"seq_len": (Shape, "max_seq_len")}


def run(args) -> int:
    arch = Architecture.parse(args.pattern, shape=args.shape)
    costs = count_costs(arch, seq_len=args.seq_len)
    try:
        megatron = to_megatron(arch.pattern)
    except PatternError:
        megatron = None
    result = {**costs.to_dict(), "megatron": megatron, "shape_config": arch.shape.to_dict()}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from rich.table import Table

    con = console()
    n = arch.n_sublayers
    table = Table(title=f"{arch.pattern}  ({arch.shape.name}, {n} sublayers)", show_lines=False)
    table.add_column("primitive")
    table.add_column("count", justify="right")
    table.add_column("ratio", justify="right")
    for key, cnt in sorted(costs.counts.items(), key=lambda kv: -kv[1]):
        name = TOKENS.get(key, "intra-layer hybrid")
        table.add_row(f"{key}  {name}", str(cnt), f"{cnt / n:.2f}")
    con.print(table)
    totals = Table(show_header=False)
    totals.add_column("what")
    totals.add_column("value", justify="right")
    totals.add_row("parameters (total)", f"{costs.params_total:,} ({human(costs.params_total)})")
    totals.add_row("parameters (active)", f"{costs.params_active:,}")
    totals.add_row("parameters (embedding)", f"{costs.params_embedding:,}")
    totals.add_row("parameters (non-embedding)", f"{costs.params_non_embedding:,}")
    totals.add_row(f"forward FLOPs / token @ {costs.seq_len}", human(costs.flops_per_token))
    totals.add_row("KV cache / token (bf16)", human_bytes(costs.kv_bytes_per_token))
    totals.add_row("recurrent state / sequence (bf16)", human_bytes(costs.state_bytes))
    if megatron:
        totals.add_row("Megatron hybrid_override_pattern", megatron)
    con.print(totals)
    return 0
