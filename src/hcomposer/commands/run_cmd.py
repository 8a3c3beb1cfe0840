"""hcomposer run: the whole pipeline on a named recipe, resumable."""

from __future__ import annotations

import json
from pathlib import Path

from hcomposer.commands.options import add_data, add_output, add_tokenizer
from hcomposer.data.stream import check_training_inputs
from hcomposer.errors import UserError
from hcomposer.format import console
from hcomposer.guards import check_output_dir
from hcomposer.pipeline import noise_sentence, run_pipeline
from hcomposer.pipeline.rehearse import rehearsal_train, rehearse_run
from hcomposer.proxies.proxy import parse_proxy
from hcomposer.recipes import Recipe, get_recipe
from hcomposer.search.space import SearchConfig
from hcomposer.tracking import add_report_to, parse_report_to
from hcomposer.training.trainer import TrainConfig

HELP = (
    "Run the whole pipeline: search -> aggregate -> scale -> train composite and baseline "
    "-> evaluate -> report (rerun to resume)."
)


def add_arguments(p) -> None:
    p.add_argument("--recipe", default="quickstart", help="quickstart (default, CPU) or paper")
    p.add_argument("--out", default=None, help="run folder (default: runs/<recipe>)")
    p.add_argument("--trials", type=int, default=None, help="override the search's trial count")
    p.add_argument("--tokens", type=int, default=None, help="override the training token budget")
    p.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    add_data(p, default="the recipe's; quickstart: the embedded corpus")
    add_tokenizer(p, None, "the recipe's")
    p.add_argument(
        "--proxy",
        default=None,
        help="override the search's proxy (mad, mad:TASK[,TASK], mqar, text); the quickstart "
        "searches on mad:recall,copy,memorize (docs/proxies.md says which tasks rank as "
        "scale does)",
    )
    p.add_argument(
        "--rehearse", action="store_true",
        help="the recipe's stages at toy size on this CPU in a few minutes: shipped data and "
        "tokenizer in the recipe's formats, FSDP on 2 processes killed and resumed, the full "
        "target counted on the meta device; writes rehearsal.json (default --out: "
        "runs/<recipe>-rehearsal)",
    )  # fmt: skip
    add_report_to(p)
    add_output(p, "no progress bars")


def option_fields() -> dict:
    """argparse dest -> (config class, field): each option is checked against the field."""
    return {
        "trials": (SearchConfig, "trials"),
        "tokens": (TrainConfig, "tokens"),
        "seed": (Recipe, "seed"),
    }


def _recipe(args):
    recipe = get_recipe(args.recipe)
    search, train = {}, {}
    changes = {}
    # Their ranges are the fields' (checked by option_fields before this runs).
    if args.trials is not None:
        search["trials"] = args.trials
    if args.tokens is not None:
        train["tokens"] = args.tokens
    if args.data is not None:
        train["data"] = args.data
    if args.tokenizer is not None:
        train["tokenizer"] = args.tokenizer
    if args.proxy is not None:
        # An unknown proxy or task: exit 2, one line. Stored in one spelling (aliases and
        # spaces resolved), so `mad:fuzzy` and `mad: fuzzy_in_context_recall` resume alike.
        kind, names = parse_proxy(args.proxy)
        search["proxy"] = f"{kind}:{','.join(names)}" if names else kind
    if args.seed is not None:
        search["seed"] = args.seed
        changes["seed"] = args.seed
    if "seed" in changes:
        train["seed"] = changes["seed"]
    # Both configs are validated here, before the run folder is touched.
    return recipe.replace(
        search=recipe.search.replace(**search), train=recipe.train.replace(**train), **changes
    )


def resolve(args) -> tuple[Recipe, Path, dict]:
    """The recipe with the options applied, the run folder, and the training data and
    tokenizer resolved (a dataset name that does not resolve, no network, a tokenizer that
    does not load: one-line errors here, before anything runs or is written)."""
    recipe = _recipe(args)
    out = Path(args.out or f"runs/{recipe.name}{'-rehearsal' if args.rehearse else ''}")
    check_output_dir(out, "--out")
    train = rehearsal_train(recipe.train) if args.rehearse else recipe.train
    inputs = check_training_inputs(train.data, train.tokenizer)
    return recipe, out, inputs


def _rehearse(args, recipe: Recipe, out: Path) -> int:
    if args.report_to:
        raise UserError("--rehearse does not report to trackers; drop --report-to")
    con = console()
    con.print(f"[bold]hcomposer run[/bold] recipe [cyan]{recipe.name}[/cyan] rehearsal -> {out}")
    say = lambda text: con.print(text, markup=False, highlight=False)  # noqa: E731
    record = rehearse_run(recipe, out, argv=args.argv, progress=not args.no_progress, say=say)
    if args.json:
        print(json.dumps(record, default=str))
        return 0
    for s in record["stages"]:
        con.print(f"{s['stage']:>18} {s['wall_seconds']:7.1f}s  {s['exercised']}",
                  markup=False, highlight=False)  # fmt: skip
    con.print(f"rehearsal passed in {record['wall_seconds']:.0f}s: {out}/rehearsal.json")
    return 0


def run(args) -> int:
    recipe, out, _ = resolve(args)
    if args.rehearse:
        return _rehearse(args, recipe, out)
    report_to = parse_report_to(args.report_to)
    con = console()
    # The banner comes with the first stage, so a refused folder prints only the error.
    banner = [f"[bold]hcomposer run[/bold] recipe [cyan]{recipe.name}[/cyan] -> {out}"]

    def say(text: str) -> None:
        if banner:
            con.print(banner.pop())
        con.print(text, markup=False, highlight=False)

    state = run_pipeline(recipe, out, argv=args.argv, progress=not args.no_progress, say=say,
                         report_to=report_to)  # fmt: skip
    rep = state["stages"]["report"]
    if args.json:
        print(json.dumps({"out": str(out), "stages": state["stages"]}, default=str))
        return 0
    from rich.table import Table

    st = state["stages"]
    summary = Table(title="hcomposer run")
    summary.add_column("stage")
    summary.add_column("result")
    best = st["search"]["best"] or {}
    summary.add_row(
        "search best",
        f"{best.get('pattern')}  score {best.get('score', 0):.4f}"
        if isinstance(best, dict)
        else str(best),
    )
    summary.add_row("aggregated", st["aggregate"]["pattern"])
    summary.add_row("composite", st["scale"]["composite"])
    summary.add_row("baseline", st["scale"]["baseline"])
    con.print(summary)
    t = Table(title="composite vs baseline")
    for i, h in enumerate(rep["table_header"]):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in rep["table"]:
        t.add_row(*row)
    con.print(t)
    _print_noise(con, rep.get("noise"))
    con.print(f"report: {rep['report']}")
    return 0


def _print_noise(con, noise: dict | None) -> None:
    """The seed noise of the search scores and of the final comparison (the report's)."""
    if not noise:
        return
    from rich.table import Table

    t = Table(title="seed noise (mean ± std over seeds)")
    t.add_column("what")
    t.add_column("per seed", justify="right")
    t.add_column("mean ± std", justify="right")
    for r in noise["rescore"]:
        per = ", ".join(f"{v:.4f}" for v in r["scores"].values())
        pm = f"{r['mean']:.4f}" + (f" ± {r['std']:.4f}" if r["std"] is not None else "")
        t.add_row(f"proxy score {r['pattern']}", per, pm)
    loss = noise["loss"]
    for role in ("baseline", "composite"):
        std = loss[f"{role}_std"]
        pm = f"{loss[f'{role}_mean']:.4f}" + (f" ± {std:.4f}" if std is not None else "")
        t.add_row(f"{role} val loss", ", ".join(f"{v:.4f}" for v in loss[role]), pm)
    con.print(t)
    con.print(noise_sentence(loss), markup=False, highlight=False)
