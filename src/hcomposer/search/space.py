"""The search space: a typed config, one categorical slot per position, stages, constraints.

A search proposes a pattern of ``layers`` sublayers; each searched position is one Optuna
categorical parameter ``p00``, ``p01``, ... whose choices are the allowed sublayers
(``A``, ``F``, ``[A|S]`` ...). Strategies (Composer, arXiv 2510.00379) split the search
into stages:

- ``one-shot``: one stage, all ``layers`` positions searched at once.
- ``end-incremental``: stage 1 searches a model of ``stage_size`` sublayers; each later
  stage keeps the best pattern so far as a fixed prefix and searches ``stage_size`` new
  positions appended at the end, until ``layers`` sublayers (the last stage may be shorter).
- ``middle-incremental``: stage 1 as above; each later stage cuts the best pattern so far
  in half (the extra sublayer of an odd length goes to the front) and searches
  ``stage_size`` new positions inserted between the halves, so the ends stay fixed and
  the model grows from the middle.

``trials`` is the total number of trained evaluations, split over the stages as evenly as
possible (earlier stages get the remainder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.config_io import Config
from hcomposer.errors import PatternError, UserError
from hcomposer.fields import spec
from hcomposer.guards import MAX_SEED
from hcomposer.io import pick
from hcomposer.pattern import TOKENS, format_pattern, parse_pattern
from hcomposer.proxies.proxy_config import ProxyConfig
from hcomposer.search.pruners import PRUNERS
from hcomposer.search.samplers import SAMPLERS
from hcomposer.shapes import Shape, resolve_shape

__all__ = [
    "FORMAT",
    "STRATEGIES",
    "OBJECTIVES",
    "SearchConfig",
    "Stage",
    "plan_stages",
    "stage_pattern",
    "param_name",
    "parse_choices",
    "parse_counts",
    "constraint_values",
]

FORMAT = "hcomposer.search/1"
STRATEGIES = ("one-shot", "end-incremental", "middle-incremental")
# Objective name -> Optuna direction. ``score`` is the proxy score (higher is better).
OBJECTIVES: dict[str, str] = {
    "score": "maximize",
    "kv": "minimize",
    "flops": "minimize",
    "throughput": "maximize",
}
# proxy_config is stored as its changes from these.
_DEFAULT_PROXY = ProxyConfig()
_DEFAULT_PROXY_DICT = _DEFAULT_PROXY.to_dict()


def parse_choices(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Slot choices from ``"AFS"``, ``"A,F,[A|S]"`` or a list; each one sublayer."""
    if isinstance(text, (list, tuple)):
        items = [str(t) for t in text]
    elif "," in text:
        items = [t for t in (s.strip() for s in text.split(",")) if t]
    else:
        # "AF[A|S]" -> every sublayer of the parsed pattern is one choice.
        try:
            items = [format_pattern([s]) for s in parse_pattern(text)]
        except PatternError as e:
            bad = text[e.position - 1] if e.position and e.position <= len(text) else text
            if bad in TOKENS or bad in "[]|()*":
                raise UserError(f"--primitives {text!r}: {_first_line(e)}") from None
            raise UserError(
                f"--primitives {text!r}: unknown primitive {bad!r}; valid tokens: "
                f"{', '.join(TOKENS)} (or a group such as [A|S])"
            ) from None
    out: list[str] = []
    for item in items:
        try:
            layers = parse_pattern(item)
        except PatternError:
            valid = ", ".join(TOKENS)
            raise UserError(
                f"--primitives: unknown primitive {item!r}; valid tokens: {valid} "
                "(or a group such as [A|S])"
            ) from None
        if len(layers) != 1:
            raise UserError(f"--primitives: choice {item!r} must be one sublayer, e.g. A or [A|S]")
        canon = format_pattern(layers)
        if canon not in out:
            out.append(canon)
    if len(out) < 2:
        raise UserError(
            f"--primitives {''.join(out) or text!r}: give at least two different choices to search"
        )
    return tuple(out)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0]


def parse_counts(items: list[str] | dict[str, int] | None, flag: str) -> dict[str, int]:
    """``["A=1", "S=3"]`` (or ``"A=1,S=3"`` items) -> ``{"A": 1, "S": 3}``."""
    if not items:
        return {}
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            for part in str(item).split(","):
                if not part.strip():
                    continue
                tok, eq, num = part.partition("=")
                if not eq:
                    raise UserError(f"{flag} {part!r}: write TOKEN=COUNT, e.g. {flag} A=1")
                pairs.append((tok.strip(), num.strip()))
    out: dict[str, int] = {}
    for tok, num in pairs:
        if tok not in TOKENS:
            raise UserError(f"{flag}: unknown primitive {tok!r}; valid tokens: {', '.join(TOKENS)}")
        try:
            n = int(num)
        except (TypeError, ValueError):
            raise UserError(f"{flag} {tok}={num}: the count must be a whole number") from None
        if n < 0:
            raise UserError(f"{flag} {tok}={n}: the count cannot be negative")
        out[tok] = n
    return out


_CHOICES = str | list[str] | tuple[str, ...]
_COUNTS = dict[str, int] | list[str] | tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class SearchConfig(Config):
    """Everything that defines a search; stored as ``search.json`` in the run folder.

    Two runs with equal configs (``workers`` aside) are the same search: re-running
    resumes it. ``storage=None`` means ``sqlite:///<out>/study.db``. ``proxy_config`` is
    the proxy's :class:`ProxyConfig` (None: its defaults); in JSON it is written as the
    fields that differ from the defaults, as it always was (``{}`` for None).
    """

    _what: ClassVar[str] = "search config"

    primitives: tuple[str, ...] = spec(
        ("A", "F", "S"), accepts=_CHOICES, help="choices per position: AFS or A,F,[A|S]"
    )
    layers: int = spec(6, ge=1, le=2**20, cap="search_layers", help="positions searched")
    trials: int = spec(30, ge=1, le=2**40, cap="trials", help="trained trials in total")
    sampler: str = spec("gp", choices=tuple(SAMPLERS), help="Optuna sampler")
    strategy: str = spec("one-shot", choices=STRATEGIES, help="how the positions are staged")
    stage_size: int | None = spec(
        None, ge=1, le=2**20, help="positions per stage of an incremental strategy"
    )
    proxy: str = spec("mad", help="mad, mad:TASK[,TASK], mqar, text or synthetic[:SECONDS]")
    shape: Shape = spec(
        factory=lambda: resolve_shape("proxy"),
        accepts=Shape | str | dict[str, Any],
        help="search shape: a Shape, a preset name or a JSON file",
    )
    objective: tuple[str, ...] = spec(
        ("score",), accepts=_CHOICES, help="score, or score and one cost (kv, flops, throughput)"
    )
    max_params: int | None = spec(None, ge=0, le=10**15, help="parameter budget")
    max_kv_bytes: int | None = spec(None, ge=0, le=10**15, unit="bytes per token")
    min_count: dict[str, int] = spec(factory=dict, accepts=_COUNTS, help="TOKEN -> at least N")
    max_count: dict[str, int] = spec(factory=dict, accepts=_COUNTS, help="TOKEN -> at most N")
    seed: int = spec(0, ge=0, le=MAX_SEED, help="sampler and proxy seed")
    n_startup: int | None = spec(None, ge=1, le=2**40, help="initial random trials of gp/tpe")
    population_size: int | None = spec(None, ge=2, le=2**20, help="evolution: population")
    storage: str | None = spec(None, help="SQLAlchemy URL or journal:PATH")
    workers: int = spec(1, ge=1, le=4096, help="local worker processes")
    # The proxy's config (None: its defaults). A dict of changed fields is accepted too.
    proxy_config: ProxyConfig | None = spec(
        None, accepts=ProxyConfig | dict[str, Any] | None, help="the proxy's settings"
    )
    # Optuna pruner of the proxy's per-task values (hcomposer.search.pruners). A stored
    # config without the field predates pruning and loads as "none".
    pruner: str = spec("none", choices=tuple(PRUNERS), help="pruner of weak trials")

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = object.__setattr__
        pc = self.proxy_config
        if isinstance(pc, dict):
            pc = ProxyConfig.from_dict(pc) if pc else None  # a bad field fails here
        # The defaults are stored as None: one value, one JSON form, one study name.
        set_(self, "proxy_config", None if pc == _DEFAULT_PROXY else pc)
        set_(self, "primitives", parse_choices(self.primitives))
        set_(self, "shape", resolve_shape(self.shape))
        obj = self.objective
        set_(self, "objective", tuple(obj.split(",")) if isinstance(obj, str) else tuple(obj))
        set_(self, "min_count", parse_counts(self.min_count, "--min-count"))
        set_(self, "max_count", parse_counts(self.max_count, "--max-count"))
        self._validate()

    def _validate(self) -> None:
        # Types, ranges and choices are the fields' declarations; here what spans fields.
        if self.pruner != "none" and len(self.objective) > 1:
            raise UserError(
                f"--pruner {self.pruner}: Optuna prunes single-objective searches only; "
                "use --pruner none with several objectives"
            )
        if self.stage_size is not None and self.stage_size > self.layers:
            raise UserError(f"--stage-size must be between 1 and --layers ({self.layers})")
        bad = [o for o in self.objective if o not in OBJECTIVES]
        if (
            bad
            or not self.objective
            or self.objective[0] != "score"
            or len(set(self.objective)) != len(self.objective)
        ):
            raise UserError(
                f"--objective {','.join(self.objective)!r}: use 'score' or 'score,COST' with "
                f"COST one of {', '.join(o for o in OBJECTIVES if o != 'score')}"
            )
        if len(self.objective) > 2:
            raise UserError("--objective: at most two objectives, the score and one cost")
        for tok, n in self.min_count.items():
            if n > self.layers:
                raise UserError(f"--min-count {tok}={n} exceeds --layers {self.layers}")
            if tok in self.max_count and self.max_count[tok] < n:
                raise UserError(
                    f"--min-count {tok}={n} is above --max-count {tok}={self.max_count[tok]}"
                )
        for choice in self.primitives:
            # A group must split the shape's heads evenly; say so now, not in trial 17.
            Architecture(pattern=choice, shape=self.shape)
        self._check_budgets_reachable()

    def _check_budgets_reachable(self) -> None:
        """Refuse a --max-params / --max-kv-bytes that even the cheapest pattern exceeds.

        Both costs are a base plus one term per sublayer, so the cheapest pattern of the
        space repeats the cheapest choice: if that is over budget, every trial would be.
        """
        if self.max_params is None and self.max_kv_bytes is None:
            return

        costs = [
            count_costs(Architecture(pattern=c * self.layers, shape=self.shape))
            for c in self.primitives
        ]
        least_params = min(c.params_total for c in costs)
        least_kv = min(c.kv_bytes_per_token for c in costs)
        if self.max_params is not None and least_params > self.max_params:
            raise UserError(
                f"--max-params {self.max_params:,}: the smallest pattern of the space has "
                f"{least_params:,} parameters at shape {self.shape.name!r}; raise the budget"
            )
        if self.max_kv_bytes is not None and least_kv > self.max_kv_bytes:
            raise UserError(
                f"--max-kv-bytes {self.max_kv_bytes:,}: every pattern of the space needs at "
                f"least {least_kv:,} bytes per token; raise the budget or add S/F/E choices"
            )

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objective]

    @property
    def effective_stage_size(self) -> int:
        if self.strategy == "one-shot":
            return self.layers
        return self.stage_size or max(1, self.layers // 2)

    def identity(self) -> dict[str, Any]:
        """The fields that make two runs the same search (``workers`` is not one)."""
        data = self.to_dict()
        data.pop("workers")
        if data["pruner"] == "none":
            data.pop("pruner")  # searches from before pruning keep their study names
        return data

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        # The proxy's settings as the fields that differ from its defaults: the form
        # search.json always had (study names are a hash of it).
        pc = {} if self.proxy_config is None else self.proxy_config.to_dict()
        changed = {k: v for k, v in pc.items() if v != _DEFAULT_PROXY_DICT[k]}
        # Changes that hold mad_tasks and no restarts load with restarts 0 and no per-task
        # batch sizes (configs from before those existed): such a config is written without
        # the two, as it was then.
        older = {k: v for k, v in changed.items() if k not in ("restarts", "task_batch_sizes")}
        if "mad_tasks" in older and older != changed:
            changed = older if ProxyConfig.from_dict(older) == self.proxy_config else changed
        data["proxy_config"] = changed
        return {"format": FORMAT, **data}

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        fmt = data.get("format", FORMAT)
        if fmt != FORMAT:
            raise UserError(f"search config format {fmt!r} is not known; expected {FORMAT!r}")
        return {k: v for k, v in data.items() if k != "format"}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def param_name(position: int) -> str:
    """The Optuna parameter of a 0-based position: ``p00``, ``p01``, ..."""
    return f"p{position:02d}"


@dataclass(frozen=True)
class Stage:
    """One stage: ``length`` sublayers, ``searched`` of them new, the rest fixed.

    The proposed pattern is ``prefix + searched slots + suffix``; ``prefix``/``suffix``
    are known only once the previous stage is done, so they are filled by ``with_fixed``.
    """

    index: int
    length: int
    searched: int
    trials: int
    prefix: tuple[str, ...] = ()
    suffix: tuple[str, ...] = ()

    @property
    def offset(self) -> int:
        """0-based position of the first searched slot."""
        return len(self.prefix)

    def with_fixed(self, prefix: tuple[str, ...], suffix: tuple[str, ...]) -> Stage:
        return Stage(self.index, self.length, self.searched, self.trials, prefix, suffix)

    def to_dict(self) -> dict[str, Any]:
        def text(part: tuple[str, ...]) -> str:
            return format_pattern([parse_pattern(c)[0] for c in part]) if part else ""

        return {
            **pick(self, "index", "length", "searched", "trials"),
            "prefix": text(self.prefix),
            "suffix": text(self.suffix),
        }


def plan_stages(config: SearchConfig) -> list[Stage]:
    """Stage lengths and trial budgets (the fixed parts are filled in at run time)."""
    n = config.effective_stage_size
    sizes = [n] * (config.layers // n)
    if config.layers % n:
        sizes.append(config.layers % n)
    if config.trials < len(sizes):
        raise UserError(
            f"--trials {config.trials} is fewer than the {len(sizes)} stages of "
            f"{config.strategy}; give at least one trial per stage"
        )
    base, extra = divmod(config.trials, len(sizes))
    stages, length = [], 0
    for i, size in enumerate(sizes):
        length += size
        trials = base + (1 if i < extra else 0)
        space = len(config.primitives) ** size
        if trials > space:
            raise UserError(
                f"stage {i + 1} searches {size} position(s) with {len(config.primitives)} choices: "
                f"only {space} distinct patterns for {trials} trials; lower --trials"
                + ("" if config.strategy == "one-shot" else " or raise --stage-size")
            )
        stages.append(Stage(i, length, size, trials))
    return stages


def stage_pattern(stage: Stage, params: dict[str, Any]) -> str:
    """The canonical pattern a stage's trial parameters stand for."""
    slots = [params[param_name(stage.offset + i)] for i in range(stage.searched)]
    return "".join([*stage.prefix, *slots, *stage.suffix])


def split_pattern(pattern: str) -> tuple[str, ...]:
    """A canonical pattern as a tuple of one-sublayer strings."""
    return tuple(format_pattern([s]) for s in parse_pattern(pattern))


def constraint_values(
    config: SearchConfig, costs: dict[str, Any], counts: dict[str, int]
) -> dict[str, float]:
    """Constraint name -> value, feasible when <= 0 (Optuna's convention), relative units.

    ``counts`` counts every token, including those inside ``[A|S]`` groups.
    """
    out: dict[str, float] = {}
    if config.max_params is not None:
        out["max_params"] = (costs["params_total"] - config.max_params) / max(1, config.max_params)
    if config.max_kv_bytes is not None:
        out["max_kv_bytes"] = (costs["kv_bytes_per_token"] - config.max_kv_bytes) / max(
            1, config.max_kv_bytes
        )
    for tok, n in sorted(config.min_count.items()):
        out[f"min_count_{tok}"] = float(n - counts.get(tok, 0))
    for tok, n in sorted(config.max_count.items()):
        out[f"max_count_{tok}"] = float(counts.get(tok, 0) - n)
    return out


def describe_violation(
    values: dict[str, float], config: SearchConfig, costs: dict, counts: dict
) -> str:
    """One line naming every violated constraint, for the trial's failure reason."""
    parts = []
    for name, v in values.items():
        if v <= 0:
            continue
        if name == "max_params":
            parts.append(f"params {costs['params_total']:,} > --max-params {config.max_params:,}")
        elif name == "max_kv_bytes":
            kv = costs["kv_bytes_per_token"]
            parts.append(f"KV {kv:,} B/token > --max-kv-bytes {config.max_kv_bytes:,}")
        else:
            kind, tok = name.rsplit("_", 1)
            limit = config.min_count[tok] if kind == "min_count" else config.max_count[tok]
            op = "<" if kind == "min_count" else ">"
            parts.append(
                f"{counts.get(tok, 0)} x {tok} {op} --{kind.replace('_', '-')} {tok}={limit}"
            )
    return "infeasible: " + "; ".join(parts)
