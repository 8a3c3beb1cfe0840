"""hcomposer proxy-rank: does the proxy rank architectures as training at a larger width does?"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hcomposer.architecture import Architecture
from hcomposer.data.sources import resolve_source
from hcomposer.errors import UserError
from hcomposer.format import console
from hcomposer.io import atomic_write_json, atomic_write_text, read_json
from hcomposer.proxies.proxy import ProxyConfig
from hcomposer.proxies.rank_correlation import RankStudy, run_proxy_rank
from hcomposer.proxies.ruler import RulerConfig
from hcomposer.proxies.ruler_study import summarise, summary_markdown, write_zoo
from hcomposer.runs import RulerDir, tracking_dir
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
    p.add_argument(
        "--data", default=None,
        help="training text at scale: a file, folder or hf:NAME[:CONFIG][@SPLIT] "
        "(default: the recipe's; cpu: the embedded corpus)",
    )  # fmt: skip
    p.add_argument(
        "--tokenizer", default=None, help="byte, bpe:N or a tokenizer.json (default: recipe's)"
    )
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
    add_report_to(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")


def option_fields() -> dict:
    """argparse dest -> (config class, field): each option is checked against the field."""
    return {"tokens": (TrainConfig, "tokens")}


def _seeds(text: str | None, flag: str, default: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return default
    try:
        seeds = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r}: write comma-separated whole numbers, e.g. 0,1") from None
    if not seeds or min(seeds) < 0:
        raise UserError(f"{flag} {text!r}: give at least one seed, none negative")
    return tuple(dict.fromkeys(seeds))


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


def run(args) -> int:
    if RulerDir(args.out).config.is_file():
        return _ruler_report(args)
    if args.recipe not in RECIPES:
        raise UserError(f"--recipe {args.recipe!r}: choose one of {', '.join(RECIPES)}")
    r = RECIPES[args.recipe]
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
    if data:
        resolve_source(data)  # a missing path is refused before anything runs
    tcfg = TrainConfig(
        tokens=tokens, seq_len=r.seq_len, batch_size=r.batch_size, lr=r.lr, min_lr=r.lr / 10,
        dtype=r.dtype, eval_every=10**9, eval_tokens=min(65536, tokens), log_every=50,
        checkpoint_every=200, data=data or None,
        tokenizer=r.tokenizer if args.tokenizer is None else args.tokenizer,
    )  # fmt: skip
    pcfg = None if r.proxy_steps is None else ProxyConfig().replace(steps=r.proxy_steps)
    con = console()
    study = RankStudy(
        proxy=r.proxy, proxy_shape=r.proxy_shape, proxy_config=pcfg,
        scale_shape=r.scale_shape, scale_layers=r.scale_layers, train_config=tcfg,
        proxy_seeds=proxy_seeds, scale_seeds=scale_seeds,
        noise_patterns=tuple(p for p in r.noise_patterns if p in patterns),
        noise_seeds=r.noise_seeds,
    )  # fmt: skip
    report_to = parse_report_to(args.report_to)
    res = run_proxy_rank(list(patterns), out, study, k=len(patterns), log=lambda m: con.print(m))
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
