"""hcomposer isoflop (formerly `scaling`, still accepted): IsoFLOP sweeps and each pattern's
compute-optimal frontier."""

from __future__ import annotations

import json
from pathlib import Path

from hcomposer.commands.options import add_data, add_output, add_tokenizer
from hcomposer.data import rehearsal_assets
from hcomposer.errors import UserError
from hcomposer.format import console, human, parse_count
from hcomposer.pipeline import rehearse as rh
from hcomposer.scaling import get_recipe, plan_sweep, run_sweep
from hcomposer.scaling.ladder import Ladder, plan_runs
from hcomposer.shapes import resolve_shape
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
    add_data(p, default="the recipe's")
    add_tokenizer(p, None, "the recipe's")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (min: lr / 10)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=None, help="training length")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto, cpu, cuda ...")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap draws (default 1000)")
    p.add_argument("--out", default="isoflop", help="sweep folder (default ./isoflop)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, train nothing")
    p.add_argument(
        "--rehearse", action="store_true",
        help="the sweep at toy size on this CPU (2 budgets x 3 tiny widths per pattern, the "
        "shipped data and tokenizer in the recipe's formats), the largest planned model counted "
        "on the meta device; writes rehearsal.json into --out",
    )  # fmt: skip
    p.add_argument(
        "--fit-only", action="store_true", help="train nothing: fit the runs already finished"
    )
    add_report_to(p)
    add_output(p)


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
    if args.recipe == "gpu" and cfg.train.data is None and not args.rehearse:
        raise UserError("--recipe gpu trains billions of tokens: pass --data (a corpus or shards)")
    return cfg


# The rehearsal's sweep (the sizes of hcomposer.pipeline.rehearse's toy runs): two budgets,
# three widths of a ladder that fits them, every size kept.
REHEARSAL_BUDGETS = (2e8, 6e8)
REHEARSAL_SIZES = (16, 24, 32)


def rehearsal_of(cfg):
    """The toy twin of a sweep: the same patterns and ladder strategy, two budgets and three
    tiny widths, each run at the rehearsal's batch and length on its data and tokenizer."""
    ladder = Ladder(head_dim=8, aspect=8, min_blocks=2, kv_group=2, ffn_multiple=16,
                    strategy=cfg.ladder.strategy, base=cfg.ladder.base)  # fmt: skip
    train = rh.rehearsal_train(cfg.train)
    return cfg.replace(budgets=REHEARSAL_BUDGETS, sizes=REHEARSAL_SIZES, tokens_per_param=None,
                       ladder=ladder, train=train, bootstrap=50)  # fmt: skip


def _largest(cfg) -> dict:
    """The full sweep's largest model on the meta device: its count against the plan's."""
    vocab, _ = rh.declared_vocab(cfg.train.tokenizer)
    vocab = vocab or resolve_shape(cfg.ladder.base).vocab_size
    runs = plan_runs(cfg.patterns, cfg.budgets, cfg.sizes, cfg.ladder,
                     vocab_size=-(-vocab // 64) * 64, seq_len=cfg.train.seq_len,
                     tokens_per_step=cfg.train.tokens_per_step,
                     tokens_per_param=cfg.tokens_per_param)  # fmt: skip
    big = max(runs, key=lambda r: r.params)
    counted = rh.meta_counts({"largest": big.arch}, cfg.train.tokenizer, cfg.train.seq_len)
    if counted["models"]["largest"]["params"] != big.params:
        raise RuntimeError(f"the plan counts {big.params:,} parameters, the model {counted}")
    return {**counted, "planned_runs": len(runs), "budget": big.budget}


def _rehearse(args, full) -> int:
    stages: list[dict] = []
    rh.timed(stages, "target", lambda: _largest(full), rh.describe_counts, details=True)
    cfg = rehearsal_of(full)
    if cfg.train.data is None and args.recipe == "gpu":  # it needs a corpus: the shipped one
        cfg = cfg.replace(train=cfg.train.replace(data=f"hf:{rehearsal_assets()[0]}"))

    def what(res: dict) -> str:
        return (
            f"{len(res['runs'])} runs ({len(cfg.patterns)} patterns x {len(cfg.budgets)} "
            f"budgets x {len(cfg.sizes)} widths) on {cfg.train.data or 'embedded'} "
            f"({cfg.train.tokenizer}); frontier fitted, an optimum inside the widths at "
            f"{sum(b['ok'] for p in res['patterns'].values() for b in p['budgets'])} of "
            f"{len(cfg.patterns) * len(cfg.budgets)} budgets"
        )

    res = rh.timed(stages, "sweep", lambda: run_sweep(cfg, args.out, progress=False,
                   argv=args.argv), what)  # fmt: skip
    record = rh.write_rehearsal(Path(args.out), "isoflop", args.recipe, stages)
    print(
        json.dumps(record, indent=2)
        if args.json
        else f"rehearsal passed in {record['wall_seconds']:.0f}s: {args.out}/rehearsal.json"
    )
    done = all(r["status"] == "completed" for r in res["runs"])
    if not done:
        raise RuntimeError(f"rehearsal: runs not completed in {args.out}")
    return 0


def run(args) -> int:
    cfg = config_from_args(args)
    if args.rehearse:
        return _rehearse(args, cfg)
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
