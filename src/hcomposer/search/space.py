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
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.config_io import check_fields, migrate
from hcomposer.errors import PatternError, UserError
from hcomposer.pattern import TOKENS, format_pattern, parse_pattern
from hcomposer.proxies.proxy import ProxyConfig
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


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """Everything that defines a search; stored as ``search.json`` in the run folder.

    Two runs with equal configs (``workers`` aside) are the same search: re-running
    resumes it. ``storage=None`` means ``sqlite:///<out>/study.db``.
    """

    primitives: tuple[str, ...] = ("A", "F", "S")
    layers: int = 6
    trials: int = 30
    sampler: str = "gp"
    strategy: str = "one-shot"
    stage_size: int | None = None
    proxy: str = "mad"
    shape: Shape = field(default_factory=lambda: resolve_shape("proxy"))
    objective: tuple[str, ...] = ("score",)
    max_params: int | None = None
    max_kv_bytes: int | None = None
    min_count: dict[str, int] = field(default_factory=dict)
    max_count: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    n_startup: int | None = None
    population_size: int | None = None
    storage: str | None = None
    workers: int = 1
    # ProxyConfig fields that differ from the proxy's defaults (e.g. fewer steps or tasks).
    proxy_config: dict[str, Any] = field(default_factory=dict)
    # Optuna pruner of the proxy's per-task values (hcomposer.search.pruners). A stored
    # config without the field predates pruning and loads as "none".
    pruner: str = "none"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.proxy_config:
            ProxyConfig.from_dict(self.proxy_config)  # a bad field fails here, before any work
        set_(self, "primitives", parse_choices(self.primitives))
        set_(self, "shape", resolve_shape(self.shape))
        obj = self.objective
        set_(self, "objective", tuple(obj.split(",")) if isinstance(obj, str) else tuple(obj))
        set_(self, "min_count", parse_counts(self.min_count, "--min-count"))
        set_(self, "max_count", parse_counts(self.max_count, "--max-count"))
        self._validate()

    def _validate(self) -> None:
        for name in ("layers", "trials", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"--{name} must be a whole number of at least 1, got {value!r}")
        if self.sampler not in SAMPLERS:
            raise UserError(
                f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}"
            )
        if self.pruner not in PRUNERS:
            raise UserError(f"unknown pruner {self.pruner!r}; choose one of: {', '.join(PRUNERS)}")
        if self.pruner != "none" and len(self.objective) > 1:
            raise UserError(
                f"--pruner {self.pruner}: Optuna prunes single-objective searches only; "
                "use --pruner none with several objectives"
            )
        if self.strategy not in STRATEGIES:
            raise UserError(
                f"unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}"
            )
        if self.stage_size is not None and not (1 <= self.stage_size <= self.layers):
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
        for name in ("max_params", "max_kv_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserError(f"--{name.replace('_', '-')} cannot be negative")
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
        if self.n_startup is not None and self.n_startup < 1:
            raise UserError("--n-startup must be at least 1")
        if self.population_size is not None and self.population_size < 2:
            raise UserError("--population-size must be at least 2")

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

    def replace(self, **changes: Any) -> SearchConfig:
        data = self.to_dict()
        data.pop("format", None)
        data.update(changes)
        return SearchConfig.from_dict(data)

    def identity(self) -> dict[str, Any]:
        """The fields that make two runs the same search (``workers`` is not one)."""
        data = self.to_dict()
        data.pop("workers")
        if data["pruner"] == "none":
            data.pop("pruner")  # searches from before pruning keep their study names
        return data

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = self.shape.to_dict()
        data["primitives"] = list(self.primitives)
        data["objective"] = list(self.objective)
        return {"format": FORMAT, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchConfig:
        data = migrate(data, "search config")
        check_fields(cls, data, "search config")
        fmt = data.pop("format", FORMAT)
        if fmt != FORMAT:
            raise UserError(f"search config format {fmt!r} is not known; expected {FORMAT!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"search config: unknown fields {', '.join(unknown)}")
        return cls(**data)

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
        return {
            "index": self.index,
            "length": self.length,
            "searched": self.searched,
            "trials": self.trials,
            "prefix": format_pattern([parse_pattern(c)[0] for c in self.prefix])
            if self.prefix
            else "",
            "suffix": format_pattern([parse_pattern(c)[0] for c in self.suffix])
            if self.suffix
            else "",
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
