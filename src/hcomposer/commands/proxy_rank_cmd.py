"""hcomposer proxy-rank: does the proxy rank architectures as training at a larger width does?"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from hcomposer.architecture import Architecture
from hcomposer.commands.options import add_data, add_output, add_tokenizer, int_list
from hcomposer.data.sources import resolve_source
from hcomposer.errors import UserError
from hcomposer.format import console
from hcomposer.io import atomic_write_json, atomic_write_text, read_json
from hcomposer.pipeline import rehearse as rh
from hcomposer.proxies.proxy_config import ProxyConfig
from hcomposer.proxies.rank_correlation import RankStudy, run_proxy_rank
from hcomposer.proxies.ruler import RulerConfig
from hcomposer.proxies.ruler_study import summarise, summary_markdown, write_zoo
from hcomposer.runs import RulerDir, tracking_dir
from hcomposer.scaling.extrapolate import stack
from hcomposer.tracking import add_report_to, finite, open_tracking, parse_report_to
from hcomposer.training.trainer import TrainConfig

HELP = "Proxy-to-scale rank correlation on text: proxy scores vs validation loss, resumable."

__all__ = ["HELP", "RECIPES", "ProxyRankRecipe", "add_arguments", "run"]

# The eight: the proxy's whole range, from no mixer (FFFFFF) to all attention.
PATTERNS = ("AAFFFF", "AFAFAF", "FFFFFF", "AFFFFF", "FAFAFA", "SFSFSF", "AFSAFS", "AAAAAA")


@dataclass(frozen=True, kw_only=True)
class ProxyRankRecipe:
    """One fixed proxy-to-scale study: what is scored, how wide and long the scale runs are."""

    patterns: tuple[str, ...] = PATTERNS
    proxy: str = "mad"
    proxy_shape: str = "proxy"
    proxy_seeds: tuple[int, ...] = (0, 1, 2)
    # None: the proxy's calibrated defaults (ProxyConfig()); set only to make a smoke run cheap.
    proxy_steps: int | None = None
    scale_shape: str = "2m"
    scale_layers: int = 12
    scale_seeds: tuple[int, ...] = (0,)
    # A second training seed on two patterns far apart measures the scale runs' noise.
    noise_patterns: tuple[str, ...] = ("AFAFAF", "FFFFFF")
    noise_seeds: tuple[int, ...] = (1,)
    tokens: int = 2_000_000
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    dtype: str = "auto"
    # Training text (None: the embedded corpus, about 4M byte tokens) and tokenizer.
    data: str | None = None
    tokenizer: str = "byte"


RECIPES: dict[str, ProxyRankRecipe] = {
    # 2-core CPU: 8 patterns x 3 proxy seeds; each stacked to 12 sublayers at the 2m width
    # (d_model 128, twice the proxy's 64) and trained on 2M tokens, plus 2 noise runs. One
    # thread trains 1,500-3,000 tokens/s there (11-22 min a run): about 1.5 h with two
    # workers (docs/history/results-log.md, "proxy-to-scale"). 10m (d_model 256) would take ~4x.
    "cpu": ProxyRankRecipe(),
    # One GPU: a 350M-class width, 24 sublayers, 2B tokens per pattern (~Chinchilla-scale
    # for its ~350M parameters would be 7B; 2B keeps the ten runs within about two days).
    "gpu": ProxyRankRecipe(
        proxy_seeds=(0, 1, 2),
        scale_shape="350m",
        scale_layers=24,
        tokens=2_000_000_000,
        seq_len=2048,
        batch_size=64,
        lr=1e-3,
        noise_seeds=(1, 2),
        # 2B tokens would be 500 passes over the embedded corpus: a web-text sample instead
        # (downloaded on first use; --data names another source), with a BPE of the 350m
        # shape's 32,768 ids trained on it.
        data="hf:HuggingFaceFW/fineweb-edu:sample-10BT",
        tokenizer="bpe:32768",
    ),
    # Seconds: for tests and trying the command.
    "smoke": ProxyRankRecipe(
        patterns=("AFAF", "FFFF", "SFSF"),
        proxy="mad:in_context_recall",
        proxy_shape="tiny",
        proxy_seeds=(0, 1),
        proxy_steps=8,
        scale_shape="tiny",
        scale_layers=4,
        noise_patterns=("AFAF",),
        tokens=1024,
        seq_len=32,
        batch_size=4,
        lr=3e-3,
        dtype="fp32",
    ),
}


def add_arguments(p) -> None:
    p.add_argument("--recipe", default="cpu", help=f"one of {', '.join(RECIPES)} (default cpu)")
    p.add_argument("--patterns", default=None, help="comma-separated patterns (default: recipe's)")
    p.add_argument("--seeds", default=None, help="proxy seeds, e.g. 0,1,2 (default: recipe's)")
    p.add_argument(
        "--scale-seeds", default=None, help="training seeds at scale (default: recipe's)"
    )
    p.add_argument("--tokens", default=None, type=int, help="training tokens at scale")
    add_data(p, default="the recipe's; cpu: the embedded corpus", what="training text at scale")
    add_tokenizer(p, None, "the recipe's")
    p.add_argument(
        "--out", default="runs/proxy_rank",
        help="study folder (resumable); a ruler study folder (with ruler.json, e.g. "
        "benchmarks/results/ruler_v3) is reported from its files alone: the ruler's "
        "reliability and the proxy zoo against the trivial rankers, nothing trained",
    )  # fmt: skip
    p.add_argument(
        "--boot", type=int, default=2000,
        help="bootstrap resamples for the intervals of a ruler study's report (default 2000)",
    )  # fmt: skip
    p.add_argument(
        "--rehearse", action="store_true",
        help="the recipe's study at toy size on this CPU (3 patterns, 2 proxy seeds, tiny "
        "scale runs on the shipped data and tokenizer in the recipe's formats), the full-size "
        "models counted on the meta device; writes rehearsal.json into --out",
    )  # fmt: skip
    add_report_to(p)
    add_output(p, None)


def option_fields() -> dict:
    """argparse dest -> (config class, field): each option is checked against the field."""
    return {"tokens": (TrainConfig, "tokens")}


def _seeds(text: str | None, flag: str, default: tuple[int, ...]) -> tuple[int, ...]:
    return default if text is None else tuple(dict.fromkeys(int_list(text, flag, least=0)))


def _ruler_report(args) -> int:
    """A ruler study's figures from its files: result.md (reliability, trivial rankers, the
    rate rule, per-pattern losses) and zoo.md (every proxy against the trivial rankers on
    the development and held-out patterns), both printed; nothing is trained."""

    out = Path(args.out)
    given = [f"--{k.replace('_', '-')}" for k in ("patterns", "seeds", "scale_seeds", "tokens",
             "data", "tokenizer") if getattr(args, k) is not None]  # fmt: skip
    if given:
        raise UserError(
            f"{out} is a ruler study, reported from its files: {', '.join(given)} does not "
            "apply (run benchmarks/ruler_v3.py to add runs)"
        )
    if args.boot < 100:
        raise UserError(f"--boot {args.boot}: give at least 100 resamples")
    for path in (RulerDir(out).split, RulerDir(out).plan):
        if not path.is_file():
            raise UserError(f"{out} lacks {path.name}: not a complete ruler study folder")
    cfg = RulerConfig(**read_json(RulerDir(out).config))
    split = read_json(RulerDir(out).split)
    res = summarise(out, split, cfg)
    atomic_write_json(RulerDir(out).result_json, res)
    atomic_write_text(RulerDir(out).result_md, summary_markdown(res))
    zoo = write_zoo(out, split, cfg, n_boot=args.boot)
    if args.json:
        print(json.dumps({"ruler": res, "zoo": read_json(RulerDir(out).zoo_json)}, indent=2))
    else:
        print(summary_markdown(res) + "\n" + zoo)
    return 0


def rehearsal_of(r: ProxyRankRecipe) -> ProxyRankRecipe:
    """The toy twin of a study (``hcomposer.pipeline.rehearse``'s shrink): its first 3
    patterns, 2 proxy seeds of the rehearsal's proxy steps, one scale seed, the scale runs at
    the toy width and step count (depth kept), data and tokenizer by the shipped fixtures."""
    patterns = r.patterns[:3]
    noise = tuple(p for p in r.noise_patterns if p in patterns)[:1]
    return dataclasses.replace(
        r, patterns=patterns, proxy_seeds=r.proxy_seeds[:2], proxy_steps=rh.PROXY_STEPS,
        scale_shape=rh.TOY_SHAPE, scale_seeds=r.scale_seeds[:1], noise_patterns=noise,
        noise_seeds=r.noise_seeds[:1], tokens=rh.STEPS * rh.BATCH * rh.SEQ_LEN,
        seq_len=rh.SEQ_LEN, batch_size=rh.BATCH, dtype="fp32", data=rh.rehearsal_data(r.data),
        tokenizer=rh.rehearsal_tokenizer(r.tokenizer),
    )  # fmt: skip


def _full_size(r: ProxyRankRecipe) -> dict:
    """The recipe's scale models at full size on the meta device, exact counts."""
    archs = {p: Architecture.parse(stack(p, r.scale_layers), r.scale_shape) for p in r.patterns}
    return rh.meta_counts(archs, r.tokenizer, r.seq_len)


def run(args) -> int:
    if RulerDir(args.out).config.is_file():
        if args.rehearse:
            raise UserError(f"{args.out} is a ruler study: --rehearse needs a new --out")
        return _ruler_report(args)
    if args.recipe not in RECIPES:
        raise UserError(f"--recipe {args.recipe!r}: choose one of {', '.join(RECIPES)}")
    full = r = RECIPES[args.recipe]
    stages: list[dict] = []
    if args.rehearse:
        r = rehearsal_of(full)
        rh.timed(stages, "target", lambda: _full_size(full), rh.describe_counts, details=True)
    patterns = tuple(p.strip() for p in args.patterns.split(",")) if args.patterns else r.patterns
    if not patterns or any(not p for p in patterns):
        raise UserError("--patterns: give non-empty patterns, comma-separated")
    for p in patterns:
        Architecture.parse(p, r.proxy_shape)  # a bad pattern is refused before anything runs
    proxy_seeds = _seeds(args.seeds, "--seeds", r.proxy_seeds)
    scale_seeds = _seeds(args.scale_seeds, "--scale-seeds", r.scale_seeds)
    tokens = r.tokens if args.tokens is None else args.tokens
    if tokens < r.batch_size * r.seq_len:
        raise UserError(f"--tokens must be at least one batch ({r.batch_size * r.seq_len})")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out!r} exists and is not a folder")
    data = r.data if args.data is None else args.data
    given_tok = args.tokenizer
    if args.rehearse:  # a source or tokenizer given is replaced by its toy twin too
        data = rh.rehearsal_data(data)
        given_tok = None if given_tok is None else rh.rehearsal_tokenizer(given_tok)
    if data:
        resolve_source(data)  # a missing path is refused before anything runs
    tcfg = TrainConfig(
        tokens=tokens, seq_len=r.seq_len, batch_size=r.batch_size, lr=r.lr, min_lr=r.lr / 10,
        dtype=r.dtype, eval_every=10**9, eval_tokens=min(65536, tokens), log_every=50,
        checkpoint_every=200, data=data or None,
        tokenizer=r.tokenizer if given_tok is None else given_tok,
    )  # fmt: skip
    pcfg = None if r.proxy_steps is None else ProxyConfig().replace(steps=r.proxy_steps)
    if args.rehearse:  # the shrink of every rehearsal (its training: one process, as here)
        pcfg, tcfg = rh.rehearsal_proxy(None), rh.rehearsal_train(tcfg)
    con = console()
    study = RankStudy(
        proxy=r.proxy, proxy_shape=r.proxy_shape, proxy_config=pcfg,
        scale_shape=r.scale_shape, scale_layers=r.scale_layers, train_config=tcfg,
        proxy_seeds=proxy_seeds, scale_seeds=scale_seeds,
        noise_patterns=tuple(p for p in r.noise_patterns if p in patterns),
        noise_seeds=r.noise_seeds,
    )  # fmt: skip
    report_to = parse_report_to(args.report_to)
    study_run = lambda: run_proxy_rank(list(patterns), out, study, k=len(patterns),  # noqa: E731
                                       log=lambda m: con.print(m))  # fmt: skip
    if not args.rehearse:
        res = study_run()
    else:

        def what(res: dict) -> str:
            return (f"{len(patterns)} patterns x {len(proxy_seeds)} proxy seeds of {r.proxy}, "
                    f"scale runs of {tokens} tokens on {data or 'embedded'} ({tcfg.tokenizer}); "
                    f"correlation {res.get('correlation')}")  # fmt: skip

        res = rh.timed(stages, "study", study_run, what)
        rh.write_rehearsal(out, "proxy-rank", args.recipe, stages)
    if res.get("correlation") is not None:
        _track(report_to, out, {"recipe": args.recipe, "patterns": list(patterns)}, res)
    if args.json:
        print(json.dumps(res, indent=2))
    elif len(patterns) < 3:
        # A worker's share of a study (two workers on one folder): its logs are the result,
        # and the study's report is left as it was.
        con.print(
            f"{len(patterns)} pattern(s): a worker's share of the study, logged in {out}. "
            "A call with 3 or more patterns computes the correlation.",
            markup=False,
            highlight=False,
        )
        return 0
    else:
        print(RulerDir(out).result_md.read_text() if RulerDir(out).result_md.exists() else res)
    return 0 if res.get("correlation") is not None or len(patterns) < 3 else 1


def _track(report_to, out: Path, params: dict, res: dict) -> None:
    """The study's tracked run: each pattern's proxy score and scale loss (one step per
    pattern, ordered by proxy score), the rank correlations and the plot; logged once per
    set of points (a study rerun with nothing new logs nothing)."""
    points = sorted(res["points"], key=lambda p: p["proxy_score"])
    with open_tracking(report_to, tracking_dir(out), run_name=out.resolve().name,
                       params=params, resume_step=0) as tracking:  # fmt: skip
        key = [[p["pattern"], p["scale_val_loss"]] for p in points]
        if not tracking or tracking.state.get("points") == key:
            return
        for i, p in enumerate(points, 1):
            metrics = {"proxy_rank/proxy_score": p["proxy_score"],
                       "proxy_rank/scale_val_loss": p["scale_val_loss"]}  # fmt: skip
            tracking.log_metrics(metrics, i)
            tracking.log_text({"proxy_rank/pattern": p["pattern"]}, i)
        corr = {f"proxy_rank/{k}": v for k, v in res["correlation"].items() if finite(v)}
        tracking.log_metrics(corr, len(points))
        tracking.log_images({"proxy_rank/plot": out / "proxy_rank.png"}, len(points))
        tracking.state["points"] = key
        tracking.save()
