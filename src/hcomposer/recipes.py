"""Named recipes: plain Python functions returning a typed :class:`Recipe`.

A recipe holds everything ``hcomposer run`` does: a :class:`~hcomposer.search.SearchConfig`,
how the winner is aggregated and scaled, a :class:`~hcomposer.training.TrainConfig` and an
:class:`EvalConfig`. ``hcomposer search --recipe NAME`` uses its search config; command-line
flags override single fields (``hcomposer search --recipe paper --trials 50``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from hcomposer.config_io import Config
from hcomposer.errors import UserError
from hcomposer.evaluation.efficiency import EfficiencyConfig
from hcomposer.evaluation.mqar_curve import MQARCurveConfig
from hcomposer.evaluation.niah import NIAHConfig
from hcomposer.fields import spec
from hcomposer.guards import MAX_SEED
from hcomposer.proxies import ProxyConfig
from hcomposer.scaling.aggregate import METHODS
from hcomposer.scaling.extrapolate import STRATEGIES
from hcomposer.search.space import SearchConfig
from hcomposer.training import TrainConfig

__all__ = [
    "Recipe",
    "EvalConfig",
    "RECIPES",
    "get_recipe",
    "quickstart",
    "paper",
    "PAPER_DATA",
    "PAPER_TOKENIZER",
]

# The paper recipe's training text and tokenizer (see ``paper``).
PAPER_DATA = "hf:HuggingFaceFW/fineweb-edu:sample-100BT"
PAPER_TOKENIZER = "hf:unsloth/Llama-3.2-1B"


def _typed(cls, data: dict[str, Any]):
    # JSON gives lists where the configs hold tuples.
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True, kw_only=True)
class EvalConfig(Config):
    """The evaluation suite run on each trained model, and the options of its parts."""

    _what: ClassVar[str] = "eval config"

    suites: tuple[str, ...] = spec(("loss", "niah", "efficiency"), help="parts of the suite")
    niah: NIAHConfig = spec(factory=NIAHConfig)
    mqar: MQARCurveConfig = spec(factory=MQARCurveConfig)
    efficiency: EfficiencyConfig = spec(factory=EfficiencyConfig)
    mad: ProxyConfig = spec(factory=ProxyConfig)
    lm_eval_fewshot: int | None = spec(None, ge=0, le=1_000, help="lm-eval few-shot examples")
    lm_eval_batch_size: int = spec(8, ge=1, le=2**16)
    lm_eval_include: str | None = spec(None, help="folder of local lm-eval task YAML files")

    def options(self) -> dict[str, Any]:
        """The options of ``hcomposer.evaluation.suite.run_suite``."""
        return {
            "niah": self.niah.to_dict(),
            "mqar": self.mqar.to_dict(),
            "efficiency": self.efficiency.to_dict(),
            "mad": self.mad.to_dict(),
            "lm_eval": {
                "num_fewshot": self.lm_eval_fewshot,
                "batch_size": self.lm_eval_batch_size,
                "include_path": self.lm_eval_include,
            },
        }

    @classmethod
    def from_options(cls, suites, options: dict[str, Any]) -> EvalConfig:
        lm = options.get("lm_eval", {})
        return cls(
            suites=tuple(suites),
            niah=NIAHConfig.from_dict(options.get("niah", {})),
            mqar=MQARCurveConfig.from_dict(options.get("mqar", {})),
            efficiency=_typed(EfficiencyConfig, options.get("efficiency", {})),
            mad=ProxyConfig.from_dict(options.get("mad", {})),
            lm_eval_fewshot=lm.get("num_fewshot"),
            lm_eval_batch_size=lm.get("batch_size", 8),
            lm_eval_include=lm.get("include_path"),
        )


@dataclass(frozen=True, kw_only=True)
class Recipe(Config):
    """Everything ``hcomposer run`` does, typed (stored in the run folder's pipeline.json)."""

    _what: ClassVar[str] = "recipe"

    name: str = spec(help="the recipe's name")
    search: SearchConfig = spec(help="the search")
    aggregate_method: str = spec("n0", choices=METHODS, help="how the winner is aggregated")
    aggregate_c: int = spec(1, ge=0, le=1_024, help="nc: positions each vote conditions on")
    scale_strategy: str = spec("stack", choices=STRATEGIES, help="how the winner is scaled")
    target_shape: str = spec("10m", help="preset or JSON file of the scaled model")
    target_layers: int = spec(0, ge=0, le=2**16, help="0: the target shape's reference depth")
    train: TrainConfig = spec(factory=TrainConfig)
    eval: EvalConfig = spec(factory=EvalConfig)
    seed: int = spec(0, ge=0, le=MAX_SEED)
    # Seed noise: composite and baseline are each trained ``train_seeds`` times (train seed
    # + 0, 1, ...; NIAH and efficiency on the first run only), and the search's top
    # ``rescore_top`` patterns are scored again on ``rescore_seeds`` extra proxy seeds.
    train_seeds: int = spec(1, ge=1, le=1_000, help="trainings of each model (seed noise)")
    rescore_top: int = spec(0, ge=0, le=10_000, help="top search patterns scored again")
    rescore_seeds: int = spec(2, ge=0, le=1_000, help="extra proxy seeds of each re-score")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "search": self.search.to_dict(),
            "aggregate_method": self.aggregate_method,
            "aggregate_c": self.aggregate_c,
            "scale_strategy": self.scale_strategy,
            "target_shape": self.target_shape,
            "target_layers": self.target_layers,
            "train": self.train.to_dict(),
            "eval_suites": list(self.eval.suites),
            "eval_options": self.eval.options(),
            "seed": self.seed,
            "train_seeds": self.train_seeds,
            "rescore_top": self.rescore_top,
            "rescore_seeds": self.rescore_seeds,
        }

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        # pipeline.json keeps the evaluation as its suites and the options of its parts.
        d = {k: v for k, v in data.items() if k not in ("eval_suites", "eval_options")}
        if "eval" in data and ("eval_suites" in data or "eval_options" in data):
            raise UserError("recipe: give eval, or eval_suites and eval_options, not both")
        if "eval_suites" in data or "eval_options" in data:
            suites, options = data.get("eval_suites", ()), data.get("eval_options", {})
            if not isinstance(suites, list) or not isinstance(options, dict):
                raise UserError("recipe: eval_suites must be a list and eval_options an object")
            d["eval"] = EvalConfig.from_options(suites, options)
        # Files written before the train config was typed hold only the changed fields.
        if isinstance(d.get("train", {}), dict):
            d["train"] = {"seed": d.get("seed", 0), **d.get("train", {})}
        return d


def quickstart() -> Recipe:
    """A first run on a laptop CPU: about 11 minutes on 2 cores (15 with the set-up).

    The search: MAD proxy, proxy shape, A/F/S over 6 positions. The MAD proxy trains on one
    thread per evaluation, so two workers use both cores of a small machine. Each trial
    scores three of MAD's six tasks (recall, selective copying, memorisation: what separates
    attention, Mamba and MLP) with the proxy's calibrated defaults (one learning rate, early
    stop; ``docs/proxies.md``): about 30 CPU-seconds a trial. ``hcomposer search --proxy mad``
    without a recipe uses all six.
    """
    search = SearchConfig(
        primitives=("A", "F", "S"),
        layers=6,
        trials=8,
        sampler="gp",
        n_startup=4,
        workers=2,
        strategy="one-shot",
        proxy="mad:in_context_recall,selective_copying,memorization",
        shape="proxy",
        objective=("score",),
        seed=0,
    )
    # dtype auto (the TrainConfig default): bf16 where the device has native bf16, fp32 on a
    # CPU without it (AVX2 only: bf16 autocast trained at 60-100 tokens/s against 1,000+ in
    # fp32, measured 2026-12-01).
    #
    # The budget that fits the 15 minutes (set-up included) on a 2-core CPU, measured
    # 2026-12-01: 8 trials (4 random, 4 GP; a calibrated trial costs 30-100 CPU-s), the
    # target shape `2m` (width 128; `10m` trained at ~1,000 tokens/s in fp32 here, `2m` at
    # 2,000-3,000), two seeds of each model at 150K tokens, the top 2 patterns re-scored on
    # 2 more proxy seeds.
    train = TrainConfig(
        tokens=150_000,
        batch_size=16,
        seq_len=256,
        lr=3e-3,
        warmup=5,
        eval_every=12,
        eval_tokens=32_768,
        checkpoint_every=12,
    )
    return Recipe(
        name="quickstart",
        search=search,
        aggregate_method="n0",
        scale_strategy="stack",
        target_shape="2m",
        target_layers=12,
        train=train,
        eval=EvalConfig(suites=("loss", "niah", "efficiency")),
        train_seeds=2,
        rescore_top=2,
        rescore_seeds=2,
    )


def paper() -> Recipe:
    """Composer's 16-position search (arXiv 2510.00379): A/F only, about 100 GP trials, then
    a Llama-3.2-1B-sized target trained on 20B tokens of web text.

    The text streams from the Hub (FineWeb-Edu's 100B-token sample: 20B tokens is one pass,
    no document repeated; nothing is downloaded ahead) and the tokenizer is Llama 3's
    128,256-entry BPE from an ungated copy of Llama-3.2-1B, so the target has the real
    model's 1,235,814,400 parameters (with the byte tokenizer it would have 973,801,472: the
    embedding table is 263M of the 1.24B).
    ``--data``/``--tokenizer`` name local copies for a machine without network.
    """
    search = SearchConfig(
        primitives=("A", "F"),
        layers=16,
        trials=100,
        sampler="gp",
        strategy="one-shot",
        proxy="mad",
        shape="proxy",
        objective=("score",),
        seed=0,
    )
    train = TrainConfig(
        tokens=20_000_000_000,
        batch_size=256,
        seq_len=2048,
        # Four micro-steps per step: at 8 GPUs each holds 8 x 2,048 tokens of activations
        # (`hcomposer plan --recipe paper --gpus 8`: about 113 GiB per GPU without
        # accumulation, past an H100's 80 GiB).
        grad_accum=4,
        lr=3e-4,
        warmup=2000,
        eval_every=1000,
        checkpoint_every=1000,
        data=PAPER_DATA,
        tokenizer=PAPER_TOKENIZER,
    )
    suites = (
        "loss",
        "niah",
        "mqar",
        "efficiency",
        "lm-eval:arc_easy,arc_challenge,hellaswag,winogrande,piqa,sciq",
    )
    return Recipe(
        name="paper",
        search=search,
        aggregate_method="n0",
        scale_strategy="stretch",
        target_shape="llama-3.2-1b",
        target_layers=32,
        train=train,
        eval=EvalConfig(suites=suites),
    )


RECIPES: dict[str, Callable[[], Recipe]] = {"quickstart": quickstart, "paper": paper}


def get_recipe(name: str) -> Recipe:
    """A recipe by name; an unknown name lists the recipes."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    return RECIPES[name]()
