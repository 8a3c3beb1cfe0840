"""hcomposer isoflop (formerly `scaling`, still accepted): IsoFLOP sweeps and each pattern's
compute-optimal frontier."""

from __future__ import annotations

import json

from hcomposer.errors import UserError
from hcomposer.format import console, human, parse_count
from hcomposer.scaling import get_recipe, plan_sweep, run_sweep
from hcomposer.tracking import add_report_to, parse_report_to
from hcomposer.training.trainer import TrainConfig

HELP = "IsoFLOP sweeps: train each pattern at several sizes per FLOP budget, fit the frontier."

__all__ = ["HELP", "add_arguments", "run"]


def add_arguments(p) -> None:
    p.add_argument(
        "patterns",
        nargs="+",
        metavar="PATTERN",
        help="searched blocks, e.g. '(AF)*n' AAFFFF (depth comes from the size ladder)",
    )
    p.add_argument("--recipe", choices=["cpu", "gpu"], default="cpu", help="default cpu")
    p.add_argument("--flops", default=None, help="compute budgets, e.g. 1e11,3e11,1e12")
    p.add_argument("--sizes", default=None, help="widths (d_model) of the ladder, e.g. 32,48,64")
    p.add_argument(
        "--tokens-per-param",
        default=None,
        metavar="LO,HI",
        help="per budget, keep the sizes trained on LO-HI tokens per parameter; 'all' keeps all",
    )
    p.add_argument("--strategy", choices=["stack", "stretch"], default=None)
    p.add_argument("--data", default=None, help="training text (default: the recipe's)")
    p.add_argument("--tokenizer", default=None, help="byte, bpe:N or tokenizer.json")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (min: lr / 10)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=None, help="training length")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto, cpu, cuda ...")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap draws (default 1000)")
    p.add_argument("--out", default="isoflop", help="sweep folder (default ./isoflop)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, train nothing")
    p.add_argument(
        "--fit-only", action="store_true", help="train nothing: fit the runs already finished"
    )
    add_report_to(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def option_fields() -> dict:
    """argparse dest -> (config class, field): each option is checked against the field."""
    return {name: (TrainConfig, name) for name in ("lr", "batch_size", "seq_len", "seed")}


def _floats(text: str, what: str) -> tuple[float, ...]:
    out = []
    for part in str(text).split(","):
        if not part.strip():
            raise UserError(f"{what} {text!r} has an empty item; write e.g. 1e11,3e11")
        try:
            out.append(
                float(parse_count(part, what)) if part.strip()[-1:].isalpha() else float(part)
            )
        except ValueError:
            raise UserError(f"{what} {part!r} is not a number") from None
    return tuple(out)


def _ints(text: str, what: str) -> tuple[int, ...]:
    vals = _floats(text, what)
    if any(v != int(v) or v < 1 for v in vals):
        raise UserError(f"{what} {text!r}: widths are positive whole numbers")
    return tuple(int(v) for v in vals)


def config_from_args(args):
    """The sweep config: the recipe with the flags' overrides (UserError on bad values)."""
    cfg = get_recipe(args.recipe)
    changes: dict = {"patterns": tuple(args.patterns)}
    if args.flops is not None:
        changes["budgets"] = _floats(args.flops, "--flops")
    if args.sizes is not None:
        changes["sizes"] = _ints(args.sizes, "--sizes")
    if args.tokens_per_param is not None:
        if args.tokens_per_param.strip().lower() == "all":
            changes["tokens_per_param"] = None
        else:
            window = _floats(args.tokens_per_param, "--tokens-per-param")
            if len(window) != 2:
                raise UserError("--tokens-per-param takes LO,HI (two numbers) or 'all'")
            changes["tokens_per_param"] = window
    if args.strategy is not None:
        changes["ladder"] = cfg.ladder.__class__(
            **{**cfg.ladder.to_dict(), "strategy": args.strategy}
        )
    train = {}
    for flag, field in (
        ("data", "data"),
        ("tokenizer", "tokenizer"),
        ("lr", "lr"),
        ("seed", "seed"),
        ("batch_size", "batch_size"),
        ("seq_len", "seq_len"),
        ("device", "device"),
    ):
        if getattr(args, flag) is not None:
            train[field] = getattr(args, flag)
    if "lr" in train:
        train["min_lr"] = train["lr"] / 10
    if "batch_size" in train or "seq_len" in train:
        # The base config's token count is a placeholder (one batch): each run sets its own.
        bs, sl = (
            train.get("batch_size", cfg.train.batch_size),
            train.get("seq_len", cfg.train.seq_len),
        )
        train["tokens"] = bs * sl
    if train:
        changes["train"] = cfg.train.replace(**train)
    if args.bootstrap is not None:
        changes["bootstrap"] = args.bootstrap
    cfg = cfg.replace(**changes)
    if args.recipe == "gpu" and cfg.train.data is None:
        raise UserError("--recipe gpu trains billions of tokens: pass --data (a corpus or shards)")
    return cfg


def run(args) -> int:
    cfg = config_from_args(args)
    report_to = parse_report_to(args.report_to)
    if args.dry_run:
        runs = [r.describe() for r in plan_sweep(cfg)]
        if args.json:
            print(json.dumps({"config": cfg.to_dict(), "runs": runs}, indent=2))
        else:
            _plan_table(runs)
        return 0
    con = console()

    def tell(r, what):
        if what not in ("skipped", "missing") and not args.json:
            con.print(f"{what} {r.block} C={r.budget:.3g} d={r.d_model}", highlight=False)

    results = run_sweep(
        cfg,
        args.out,
        progress=not args.no_progress and not args.json,
        argv=args.argv,
        on_run=tell,
        fit_only=args.fit_only,
        report_to=report_to,
    )
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        _results_table(results, args.out)
    return 0


def _plan_table(runs: list[dict]) -> None:
    from rich.table import Table

    t = Table(title="IsoFLOP plan")
    for col in ("pattern", "budget", "d_model", "model", "params", "tokens", "D/N", "FLOPs/C"):
        t.add_column(col, justify="right")
    for r in runs:
        t.add_row(
            r["pattern"],
            f"{r['budget']:.3g}",
            str(r["d_model"]),
            r["model"],
            human(r["params"]),
            human(r["tokens"]),
            f"{r['tokens_per_param']:.1f}",
            f"{r['flops'] / r['budget']:.3f}",
        )
    console().print(t)


def _interval(v: dict | None, fmt: str = ".3f") -> str:
    if not v:
        return "-"
    s = f"{v['slope']:{fmt}}"
    if v["boot_draws"]:
        s += f" [{v['boot_low']:{fmt}}, {v['boot_high']:{fmt}}]b"
    if v["n"] >= 3:
        s += f" [{v['ols_low']:{fmt}}, {v['ols_high']:{fmt}}]t"
    return s


def _results_table(results: dict, out: str) -> None:
    from rich.table import Table

    con = console()
    t = Table(title="IsoFLOP optima (per budget)")
    for col in ("pattern", "budget", "runs", "N*", "D*", "D*/N*", "L*", "note"):
        t.add_column(col, justify="right")
    for block, res in results["patterns"].items():
        for b in res["budgets"]:
            ok = b["ok"]
            t.add_row(
                block,
                f"{b['budget']:.3g}",
                str(b["n_runs"]),
                human(b["n_opt"]) if ok else "-",
                human(b["d_opt"]) if ok else "-",
                human(b["d_opt"] / b["n_opt"]) if ok else "-",
                f"{b['loss_opt']:.4f}" if ok else "-",
                b["note"],
            )
    con.print(t)
    f = Table(title="compute-optimal frontier (95%: b = bootstrap over runs, t = OLS)")
    for col in ("pattern", "N* ∝ C^a", "D* ∝ C^b", "dL*/dlog10 C", "L* ∝ C^e"):
        f.add_column(col, justify="right")
    for block, res in results["patterns"].items():
        f.add_row(
            block,
            _interval(res["n_exponent"]),
            _interval(res["d_exponent"]),
            _interval(res["loss_slope"], ".4f"),
            _interval(res["loss_exponent"], ".4f"),
        )
    con.print(f)
    missing = sum(r["status"] != "completed" for r in results["runs"])
    if missing:
        con.print(f"[yellow]{missing} run(s) not finished: fitted without them[/yellow]")
    con.print(f"results.json, isoflop.png, frontier.png in {out}")
