"""hcomposer plan: what a recipe will cost (FLOPs, memory per GPU, wall time) before it runs."""

from __future__ import annotations

import json
import sys

from hcomposer.commands.options import add_output
from hcomposer.errors import UserError
from hcomposer.format import console, human, human_bytes
from hcomposer.io import atomic_write_json
from hcomposer.pipeline.plan import card, plan_recipe
from hcomposer.recipes import get_recipe

HELP = "Estimate a recipe's tokens, FLOPs, memory per GPU and wall time before it runs."

__all__ = ["HELP", "add_arguments", "run"]


def add_arguments(p) -> None:
    p.add_argument("--recipe", required=True, help="recipe name (quickstart, paper, ...)")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (default 1)")
    p.add_argument(
        "--gpu", default="h100", help="h100, h200, a100 or cpu (measured matmul peak; default h100)"
    )
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation (default 0.4)")
    p.add_argument("--memory-gib", type=float, default=None, help="override the card's memory")
    p.add_argument(
        "--block", default=None, help="the searched block to assume (default: the search's "
        "primitives in turn, e.g. AFAF...)"
    )  # fmt: skip
    add_output(p, None)
    p.add_argument("--out", default=None, help="also write the plan as JSON to this file")
    p.add_argument(
        "--strict", action="store_true", help="exit 2 when the training memory will not fit"
    )


def _check(args) -> None:
    if args.gpus < 1:
        raise UserError(f"--gpus must be at least 1 (got {args.gpus})")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1] (got {args.mfu:g})")
    if args.memory_gib is not None and not args.memory_gib > 0:
        raise UserError(f"--memory-gib must be positive (got {args.memory_gib:g})")


def _hours(seconds: float) -> str:
    if seconds >= 360:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds:,.0f} s" if seconds >= 1 else f"{seconds:.2g} s"


def _flops(n: float) -> str:
    return f"{n:.3g}" if n else "0"


def _print(plan: dict) -> None:
    from rich.table import Table

    con = console()
    title = (
        f"plan of recipe {plan['recipe']}: {plan['gpus']} x {plan['gpu']} at MFU "
        f"{plan['mfu']:g} ({human(plan['peak_flops_per_gpu'])}FLOP/s peak each)"
    )
    models = Table(title=title)
    models.add_column("per model")
    rows = plan["models"]
    for r in rows:
        models.add_column(r["role"], justify="right")
    mems = [r["train_memory"] for r in rows]
    lines = [
        ("parameters (total)", [f"{r['params_total']:,}" for r in rows]),
        ("parameters (non-embedding)", [f"{r['params_non_embedding']:,}" for r in rows]),
        ("parameters (active)", [f"{r['params_active']:,}" for r in rows]),
        ("training: sharding", [r["sharding"] for r in rows]),
        ("weights (fp32) / GPU", [human_bytes(m["weights"]) for m in mems]),
        ("gradients (fp32) / GPU", [human_bytes(m["grads"]) for m in mems]),
        ("AdamW state / GPU", [human_bytes(m["optimizer"]) for m in mems]),
        (f"activations / GPU ({mems[0]['micro_batch']} x {plan['seq_len']:,})",
         [human_bytes(m["activations"]) for m in mems]),
        ("training memory / GPU", [human_bytes(m["total"]) for m in mems]),
        (f"KV cache + state @ {rows[0]['eval_context']:,} tokens",
         [human_bytes(r["cache_bytes"]) for r in rows]),
    ]  # fmt: skip
    for name, cells in lines:
        models.add_row(name, *cells)
    con.print(models)
    stages = Table()
    for col in ("stage", "tokens", "FLOPs", f"wall @ MFU {plan['mfu']:g}", "what"):
        stages.add_column(col, justify="left" if col in ("stage", "what") else "right")
    for s in plan["stages"]:
        stages.add_row(s["stage"], human(s["tokens"]), _flops(s["flops"]), _hours(s["seconds"]),
                       s["note"])  # fmt: skip
    stages.add_row("total", "", _flops(plan["total_flops"]), _hours(plan["total_seconds"]),
                   f"{plan['gpu_hours']:,.1f} GPU-hours")  # fmt: skip
    con.print(stages)
    for r in plan["models"]:
        con.print(f"{r['role']}: {r['pattern']}")
    con.print(
        f"assumed searched block: {plan['block']} (--block); "
        f"vocabulary {plan['vocab']:,} from {plan['vocab_note']}"
    )


def run(args) -> int:
    _check(args)
    recipe = get_recipe(args.recipe)
    gpu = card(args.gpu, args.memory_gib)
    plan = plan_recipe(recipe, gpus=args.gpus, gpu=gpu, mfu=args.mfu, block=args.block)
    if not plan["fits"]:
        line = (
            f"training needs {human_bytes(plan['memory_needed'])} per GPU, more than the "
            f"{human_bytes(plan['memory_per_gpu'])} of a {plan['gpu']}: add GPUs, "
            "accumulation steps (train.grad_accum) or FSDP"
        )
        if args.strict:
            raise UserError(line)
        print(f"warning: {line}", file=sys.stderr)
    if args.out:
        atomic_write_json(args.out, plan)
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        _print(plan)
    return 0
