"""Named recipes: plain Python functions returning a typed :class:`Recipe`.

A recipe holds everything ``hcomposer run`` does: a :class:`~hcomposer.search.SearchConfig`,
how the winner is aggregated and scaled, a :class:`~hcomposer.training.TrainConfig` and an
:class:`EvalConfig`. ``hcomposer search --recipe NAME`` uses its search config; command-line
flags override single fields (``hcomposer search --recipe paper --trials 50``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hcomposer.errors import UserError
from hcomposer.evaluation.efficiency import EfficiencyConfig
from hcomposer.evaluation.mqar_curve import MQARCurveConfig
from hcomposer.evaluation.niah import NIAHConfig
from hcomposer.proxies import ProxyConfig
from hcomposer.search.space import SearchConfig
from hcomposer.training import TrainConfig

__all__ = ["Recipe", "EvalConfig", "RECIPES", "get_recipe", "quickstart", "paper"]


def _typed(cls, data: dict[str, Any]):
    # JSON gives lists where the configs hold tuples.
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """The evaluation suite run on each trained model, and the options of its parts."""

    suites: tuple[str, ...] = ("loss", "niah", "efficiency")
    niah: NIAHConfig = field(default_factory=NIAHConfig)
    mqar: MQARCurveConfig = field(default_factory=MQARCurveConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)
    mad: ProxyConfig = field(default_factory=ProxyConfig)
    lm_eval_fewshot: int | None = None
    lm_eval_batch_size: int = 8

    def options(self) -> dict[str, Any]:
        """The options of ``hcomposer.evaluation.suite.run_suite``."""
        return {
            "niah": self.niah.to_dict(),
            "mqar": self.mqar.to_dict(),
            "efficiency": self.efficiency.to_dict(),
            "mad": self.mad.to_dict(),
            "lm_eval": {"num_fewshot": self.lm_eval_fewshot, "batch_size": self.lm_eval_batch_size},
        }

    @classmethod
    def from_options(cls, suites, options: dict[str, Any]) -> EvalConfig:
        lm = options.get("lm_eval", {})
        return cls(
            suites=tuple(suites),
            niah=_typed(NIAHConfig, options.get("niah", {})),
            mqar=_typed(MQARCurveConfig, options.get("mqar", {})),
            efficiency=_typed(EfficiencyConfig, options.get("efficiency", {})),
            mad=ProxyConfig.from_dict(options.get("mad", {})),
            lm_eval_fewshot=lm.get("num_fewshot"),
            lm_eval_batch_size=lm.get("batch_size", 8),
        )


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Everything ``hcomposer run`` does, typed (stored in the run folder's pipeline.json)."""

    name: str
    search: SearchConfig
    aggregate_method: str = "n0"
    aggregate_c: int = 1
    scale_strategy: str = "stack"
    target_shape: str = "10m"
    target_layers: int = 0  # 0: the target shape's reference depth
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    # Seed noise: composite and baseline are each trained ``train_seeds`` times (train seed
    # + 0, 1, ...; NIAH and efficiency on the first run only), and the search's top
    # ``rescore_top`` patterns are scored again on ``rescore_seeds`` extra proxy seeds.
    train_seeds: int = 1
    rescore_top: int = 0
    rescore_seeds: int = 2

    def __post_init__(self) -> None:
        for name, least in (("train_seeds", 1), ("rescore_top", 0), ("rescore_seeds", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise UserError(f"recipe: {name} must be a whole number >= {least}, got {value!r}")

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

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
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        d = dict(d)
        seed = d.get("seed", 0)
        return cls(
            name=d["name"],
            search=SearchConfig.from_dict(d["search"]),
            aggregate_method=d.get("aggregate_method", "n0"),
            aggregate_c=d.get("aggregate_c", 1),
            scale_strategy=d.get("scale_strategy", "stack"),
            target_shape=d.get("target_shape", "10m"),
            target_layers=d.get("target_layers", 0),
            # Files written before the train config was typed hold only the changed fields.
            train=TrainConfig.from_dict({"seed": seed, **d.get("train", {})}),
            eval=EvalConfig.from_options(d.get("eval_suites", ()), d.get("eval_options", {})),
            seed=seed,
            train_seeds=d.get("train_seeds", 1),
            rescore_top=d.get("rescore_top", 0),
            rescore_seeds=d.get("rescore_seeds", 2),
        )


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
    """Composer's 16-position search (arXiv 2510.00379): A/F only, about 100 GP trials."""
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
        lr=3e-4,
        warmup=2000,
        eval_every=1000,
        checkpoint_every=1000,
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
