"""hcomposer score (formerly `evaluate`, still accepted): score one pattern with a cheap
proxy (MAD, MQAR, text loss)."""

from __future__ import annotations

import json
import math

from hcomposer.architecture import Architecture
from hcomposer.commands.options import add_output
from hcomposer.errors import UserError
from hcomposer.format import console, human, parse_count
from hcomposer.proxies.proxy import evaluate_proxy, parse_proxy
from hcomposer.proxies.proxy_config import ProxyConfig
from hcomposer.training.step import resolve_device

HELP = "Score a pattern with a proxy: MAD tasks, MQAR or text loss at a token budget."

__all__ = ["HELP", "add_arguments", "run"]


def add_arguments(p) -> None:
    p.add_argument("pattern", help="pattern, e.g. AFAF or (A[A|S]F)*2, or an architecture JSON")
    p.add_argument(
        "--proxy",
        default="mad",
        help="mad (all six tasks, default), mad:TASK[,TASK] (e.g. mad:recall,copy), mqar or text",
    )
    p.add_argument("--shape", default="proxy", help="shape preset or JSON (default proxy)")
    p.add_argument("--data", default=None, help="text proxy corpus (default: the embedded one)")
    p.add_argument("--seed", type=int, default=0, help="data, init and batch-order seed")
    p.add_argument("--steps", type=int, default=None, help="training steps per task and grid point")
    p.add_argument("--tokens", default=None, help="text proxy token budget, e.g. 256K")
    p.add_argument(
        "--lrs", default=None, help="learning-rate grid, comma-separated, e.g. 1e-3,4e-3"
    )
    p.add_argument("--wds", default=None, help="weight-decay grid, comma-separated, e.g. 0,0.1")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default=None, help="default fp32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda[:N]"
    )
    p.add_argument("--config", default=None, help="a ProxyConfig JSON file; flags override it")
    add_output(p, None)


def option_fields() -> dict:
    """argparse dest -> (config class, field): each option is checked against the field."""
    return {name: (ProxyConfig, name) for name in ("seed", "steps", "dtype", "threads")}


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r}: numbers separated by commas, e.g. 1e-3,4e-3") from None
    if not values:
        raise UserError(f"{flag} needs at least one value")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise UserError(f"{flag} {text!r}: every value must be a finite number >= 0")
    return values


def _config(args):
    config = ProxyConfig.from_json(args.config) if args.config else ProxyConfig()
    changes = {}
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.tokens is not None:
        changes["text_tokens"] = parse_count(args.tokens, "--tokens")
    if args.lrs is not None:
        changes["lrs"] = _floats(args.lrs, "--lrs")
    if args.wds is not None:
        changes["weight_decays"] = _floats(args.wds, "--wds")
    if args.dtype is not None:
        changes["dtype"] = args.dtype
    if args.threads is not None:
        changes["threads"] = args.threads
    return config.replace(**changes) if changes else config


def _architecture(pattern: str, shape: str):
    if pattern.strip().startswith("{") or pattern.endswith(".json"):
        return Architecture.from_json(pattern)
    return Architecture.parse(pattern, shape=shape)


def run(args) -> int:
    # Everything a user can get wrong is checked before any training starts.

    parse_proxy(args.proxy)
    arch = _architecture(args.pattern, args.shape)
    config = _config(args)
    device = resolve_device(args.device)
    result = evaluate_proxy(
        arch, args.proxy, seed=args.seed, data=args.data, config=config, progress=True,
        device=device,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    _table(result, arch)
    return 0


def _table(result, arch) -> None:
    from rich.table import Table

    table = Table(title=f"{result.proxy} proxy: {arch.pattern} @ {arch.shape.name}")
    for col in ("task", "accuracy", "loss", "best lr", "wd", "runs"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, t in result.tasks.items():
        loss = t["loss"]
        table.add_row(
            name,
            f"{t['accuracy']:.3f}",
            "-" if loss != loss else f"{loss:.3f}",
            f"{t['lr']:g}",
            f"{t['weight_decay']:g}",
            str(len(t.get("grid", [1]))),
        )
    con = console()
    con.print(table)
    what = "minus validation loss" if result.proxy == "text" else "mean accuracy"
    con.print(
        f"score {result.score:.4f} ({what}); {human(result.params_total)} parameters; "
        f"{result.wall_seconds:.1f} s, {result.tokens_per_second:,.0f} tokens/s"
    )
    for f in result.failures:
        con.print(f"[yellow]failure:[/yellow] {f}")
