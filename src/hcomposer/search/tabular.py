"""Tabular search benchmark: replay samplers against a table of every pattern's score.

A table scores every pattern of a small space (``af6``: all 64 six-position ``A``/``F``
patterns, built by ``benchmarks/build_tabular.py``). Replaying a sampler against it
costs no training: each proposal is answered by a table lookup through Optuna's
ask/tell on an in-memory study, with the sampler built by ``make_sampler`` exactly as
``hcomposer search`` builds it, so the comparison measures the samplers themselves.

The replay follows the search engine's accounting: a pattern proposed again is told
its known score and costs nothing (the engine answers it from the log as a ``CACHED``
trial), so the budget counts *evaluations*, distinct patterns, as ``--trials`` does;
a sampler that keeps re-proposing stops after ``max(50, 5 x budget)`` such repeats,
as the engine stops a stage.

Definitions used in the report:

- true top-k: every pattern whose score is at least the k-th highest score (ties can
  make it larger than k);
- evaluations to top-k: the number of distinct patterns evaluated up to and including
  the first proposal of a true top-k pattern (= the ``--trials`` a search needs). A
  seed that never proposes one within the budget counts as ``budget + 1`` (so medians
  stay defined) and is reported as a miss; ``asks`` counts proposals, repeats included;
- regret after e evaluations: best score in the table minus the best score found.

A replay stops once the top-1 pattern is proposed: from then on regret is zero and both
hit times are known, so the curve is completed with zeros.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from hcomposer.config_io import read_json_file
from hcomposer.errors import UserError
from hcomposer.pattern import format_pattern, parse_pattern
from hcomposer.search.samplers import make_sampler
from hcomposer.stats import (
    noise_floor,
    spearman,
    tied_with_best,
)

__all__ = [
    "FORMAT",
    "Table",
    "load_table",
    "synthetic_table",
    "describe_table",
    "Replay",
    "replay",
    "bench",
]

FORMAT = "hcomposer.tabular/1"


@dataclass(frozen=True)
class Table:
    """Scores of every pattern of a space of ``positions`` slots over ``choices``."""

    name: str
    choices: tuple[str, ...]
    positions: int
    scores: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        expected = len(self.choices) ** self.positions
        if len(self.scores) != expected:
            raise UserError(
                f"table {self.name!r} scores {len(self.scores)} patterns; a full space of "
                f"{self.positions} positions over {''.join(self.choices)} has {expected}"
            )
        for p in self.scores:
            layers = parse_pattern(p)
            if len(layers) != self.positions or any(
                format_pattern([s]) not in self.choices for s in layers
            ):
                raise UserError(f"table {self.name!r}: pattern {p!r} is outside its space")

    @property
    def ranked(self) -> list[tuple[str, float]]:
        """Patterns best first (ties by pattern text, for a stable order)."""
        return sorted(self.scores.items(), key=lambda kv: (-kv[1], kv[0]))

    @property
    def best_score(self) -> float:
        return max(self.scores.values())

    @property
    def seeds(self) -> list[str]:
        """Seed labels of the per-seed scores (``meta["per_seed"]``); empty for one-score tables."""
        per_seed = self.meta.get("per_seed") or {}
        return sorted({k for v in per_seed.values() for k in v}, key=_seed_key)

    def seed_scores(self, pattern: str) -> list[float]:
        """Every seed's score of ``pattern`` (seed order), or its one score."""
        per_seed = (self.meta.get("per_seed") or {}).get(pattern)
        if not per_seed:
            return [self.scores[pattern]]
        return [float(per_seed[k]) for k in sorted(per_seed, key=_seed_key)]

    def per_seed_scores(self) -> dict[str, list[float]]:
        """Pattern -> every seed's score: the input of the noise statistics."""
        return {p: self.seed_scores(p) for p in self.scores}

    def tied(self, level: float = 0.95) -> frozenset[str]:
        """Patterns statistically tied with the best (``stats.tied_with_best``).

        With one seed per pattern there is no noise estimate: the top-1 (with exact ties).
        """
        if len(self.seeds) < 2:
            return self.top(1)
        return tied_with_best(self.per_seed_scores(), level)[0]

    def top(self, k: int) -> frozenset[str]:
        """Every pattern scoring at least the k-th highest score."""
        cut = self.ranked[min(k, len(self.scores)) - 1][1]
        return frozenset(p for p, s in self.scores.items() if s >= cut)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "choices": list(self.choices),
            "positions": self.positions,
            **self.meta,
            "scores": dict(self.ranked),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Table:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise UserError(f"not a tabular benchmark table (format {found!r})")
        _check_table_fields(data)
        meta = {
            k: v
            for k, v in data.items()
            if k not in ("format", "name", "choices", "positions", "scores")
        }
        return cls(
            name=data["name"],
            choices=tuple(data["choices"]),
            positions=int(data["positions"]),
            scores={str(k): float(v) for k, v in data["scores"].items()},
            meta=meta,
        )


def _check_table_fields(data: dict[str, Any]) -> None:
    """Types of a table's fields (the file is user input): one UserError naming the field."""
    checks = {
        "name": lambda v: isinstance(v, str),
        "choices": lambda v: isinstance(v, list) and v and all(isinstance(c, str) for c in v),
        "positions": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64,
        "scores": lambda v: (
            isinstance(v, dict)
            and all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                for s in v.values()
            )
        ),
    }
    for name, ok in checks.items():
        if name not in data:
            raise UserError(f"table: field {name!r} is missing")
        if not ok(data[name]):
            want = {"name": "a string", "choices": "a list of tokens",
                    "positions": "a whole number from 1 to 64",
                    "scores": "an object of pattern: finite number"}[name]  # fmt: skip
            raise UserError(f"table: field {name!r} must be {want}")


def _seed_key(label: str) -> tuple[int, str]:
    return (int(label), "") if label.lstrip("-").isdigit() else (0, label)


def synthetic_table(
    choices: str | Sequence[str] = "AF", positions: int = 6, seed: int = 0, noise: float = 0.05
) -> Table:
    """A structured random table for tests and development (no training).

    Score = per-position main effects + pairwise interactions of neighbours + a penalty
    on the distance of each choice's share from a random target ratio + noise: enough
    structure for a model-based sampler to exploit, like a real proxy table.
    """
    choices = tuple(choices) if isinstance(choices, str) else tuple(choices)
    rng = random.Random(seed)
    main = [{c: rng.gauss(0, 1) for c in choices} for _ in range(positions)]
    pair = [{(a, b): rng.gauss(0, 0.5) for a in choices for b in choices} for _ in range(positions)]
    target = {c: rng.random() for c in choices}
    norm = sum(target.values())
    target = {c: v / norm for c, v in target.items()}
    scores = {}
    for combo in itertools.product(choices, repeat=positions):
        s = sum(main[i][c] for i, c in enumerate(combo))
        s += sum(pair[i][(combo[i], combo[i + 1])] for i in range(positions - 1))
        s -= 4.0 * sum((combo.count(c) / positions - target[c]) ** 2 for c in choices)
        s += rng.gauss(0, noise)
        scores["".join(combo)] = round(s, 6)
    return Table(
        name=f"synthetic-{''.join(choices)}{positions}-s{seed}",
        choices=choices,
        positions=positions,
        scores=scores,
        meta={"synthetic": {"seed": seed, "noise": noise}},
    )


def _asset_names() -> list[str]:
    folder = resources.files("hcomposer") / "assets" / "tabular"
    return sorted(f.name[: -len(".json")] for f in folder.iterdir() if f.name.endswith(".json"))


def load_table(spec: str | Path) -> Table:
    """A table by name (``af6``: the committed asset), ``synthetic[:CHOICES:N:SEED]`` or path."""
    text = str(spec)
    if text.startswith("synthetic"):
        parts = text.split(":")
        try:
            choices = parts[1] if len(parts) > 1 else "AF"
            positions = int(parts[2]) if len(parts) > 2 else 6
            seed = int(parts[3]) if len(parts) > 3 else 0
        except ValueError:
            raise UserError(
                f"table {text!r}: write synthetic[:CHOICES[:POSITIONS[:SEED]]]"
            ) from None
        if positions < 1 or len(choices) ** positions > 100_000:
            raise UserError(f"table {text!r}: the space must have 1 to 100000 patterns")
        return synthetic_table(choices, positions, seed)
    path = Path(text)
    if not path.suffix and "/" not in text:
        asset = resources.files("hcomposer") / "assets" / "tabular" / f"{text}.json"
        if not asset.is_file():
            raise UserError(
                f"unknown table {text!r}; use a committed one ({', '.join(_asset_names())}), "
                "synthetic[:CHOICES:N:SEED] or a JSON path"
            )
        data = json.loads(asset.read_text())
    else:
        data = read_json_file(path, "table file")
        try:
            return Table.from_dict(data)
        except UserError as e:
            raise UserError(f"table file {text!r}: {e}") from None
    return Table.from_dict(data)


def describe_table(table: Table, n: int = 5) -> dict[str, Any]:
    """The structure of a table: extremes, score by primitive count and by position.

    ``position_effect[c][i]`` is the mean score of patterns with ``c`` at position ``i``
    minus the mean of all patterns; ``seed_spearman`` is the rank correlation between
    the per-seed score columns when the table stores them (``per_seed``): how far the
    proxy's ranking is from noise. With several seeds it also gives the ``noise_floor``
    (median per-pattern seed standard deviation), the patterns ``tied_with_best`` (a
    one-sided 95% test with pooled seed noise, ``stats.tied_with_best``) and the gap
    (``tie_margin``) below the best mean that still counts as a tie; with parameter counts
    (``meta["params_total"]``), ``spearman_score_params``: how much of the score is size.
    """
    ranked = table.ranked
    overall = statistics.fmean(table.scores.values())
    layers = {p: [format_pattern([x]) for x in parse_pattern(p)] for p in table.scores}
    by_count: dict[str, dict[int, float]] = {}
    for c in table.choices:
        groups: dict[int, list[float]] = {}
        for p, s in table.scores.items():
            groups.setdefault(layers[p].count(c), []).append(s)
        by_count[c] = {k: statistics.fmean(v) for k, v in sorted(groups.items())}
    effect = {
        c: [
            statistics.fmean(s for p, s in table.scores.items() if layers[p][i] == c) - overall
            for i in range(table.positions)
        ]
        for c in table.choices
    }
    out: dict[str, Any] = {
        "n_patterns": len(ranked),
        "mean": overall,
        "stdev": statistics.pstdev(table.scores.values()),
        "best": ranked[:n],
        "worst": ranked[-n:],
        "mean_by_count": by_count,
        "position_effect": effect,
    }
    per_seed = table.meta.get("per_seed")
    if per_seed:
        seeds = sorted({k for v in per_seed.values() for k in v})
        pats = sorted(per_seed)
        pairs = {}
        for i, a in enumerate(seeds):
            for b in seeds[i + 1 :]:
                pairs[f"{a}-{b}"] = spearman(
                    [per_seed[p][a] for p in pats], [per_seed[p][b] for p in pats]
                )
        out["seed_spearman"] = pairs
        tied, margins = tied_with_best(table.per_seed_scores())
        best = ranked[0][0]
        out["noise_floor"] = noise_floor(table.per_seed_scores())
        out["tied_with_best"] = sorted(tied, key=lambda p: (-table.scores[p], p))
        out["tie_margin"] = margins[best]
    params = table.meta.get("params_total")
    if params and all(p in params for p in table.scores):
        pats = sorted(table.scores)
        out["spearman_score_params"] = spearman(
            [table.scores[p] for p in pats], [float(params[p]) for p in pats]
        )
    return out


@dataclass(frozen=True)
class Replay:
    """One sampler, one seed: the proposals, what was observed, when the top was hit.

    ``observed`` holds the score the sampler was told for each distinct pattern, in order of
    evaluation (one seed's score drawn at random in a noisy replay); ``regret[e-1]`` is the
    best mean score in the table minus the *mean* score of the pattern the search would
    recommend after ``e`` evaluations (the best observed one).
    """

    sampler: str
    seed: int
    budget: int
    proposals: list[str]
    regret: list[float]
    evals_to_top1: int | None
    evals_to_top3: int | None
    asks_to_top1: int | None
    asks_to_top3: int | None
    observed: list[float] = field(default_factory=list)
    evals_to_tied: int | None = None
    noisy: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Replay:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def table_digest(table: Table) -> str:
    """A short hash of the whole table (space, scores, per-seed scores and its metadata): a
    replay log is reused only against the very table it was made with."""
    text = json.dumps(table.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # GPSampler is flagged experimental; the warning says nothing about this replay.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def replay(
    table: Table,
    sampler: str,
    seed: int,
    budget: int,
    n_startup: int | None = None,
    noisy: bool | None = None,
    tied: frozenset[str] | None = None,
) -> Replay:
    """Run ``sampler`` until ``budget`` distinct patterns are evaluated (table lookups).

    ``noisy`` (default: whenever the table has several seeds) answers each first evaluation
    of a pattern with one of its seeds' scores drawn at random, as a real search meets seed
    noise; a repeated proposal is answered from the log (the same observed score). A noiseless
    replay stops once the top-1 pattern is proposed (regret is zero from then on); a noisy one
    runs the whole budget, since finding the top-1 does not mean recognising it.
    """
    import optuna

    _quiet_optuna()
    noisy = len(table.seeds) > 1 if noisy is None else noisy
    tied = table.tied() if tied is None else tied
    draw = random.Random(f"noise-{seed}")
    study = optuna.create_study(
        direction="maximize", sampler=make_sampler(sampler, seed, 1, n_startup=n_startup)
    )
    top1, top3 = table.top(1), table.top(3)
    best_possible = table.best_score
    proposals: list[str] = []
    regret: list[float] = []
    observed: dict[str, float] = {}
    hits: dict[str, tuple[int, int]] = {}
    recommended, best_seen = None, -math.inf
    repeats, cap = 0, max(50, 5 * budget)
    while len(observed) < budget and repeats < cap:
        trial = study.ask()
        # Same parameter names as the search space (p00, p01, ...).
        pattern = "".join(
            trial.suggest_categorical(f"p{i:02d}", list(table.choices))
            for i in range(table.positions)
        )
        proposals.append(pattern)
        if pattern in observed:
            study.tell(trial, observed[pattern])
            repeats += 1
            continue
        score = draw.choice(table.seed_scores(pattern)) if noisy else table.scores[pattern]
        study.tell(trial, score)
        observed[pattern] = score
        if score > best_seen:
            recommended, best_seen = pattern, score
        regret.append(best_possible - table.scores[recommended])
        n = len(observed)
        if pattern in top3 and "top3" not in hits:
            hits["top3"] = (n, len(proposals))
        if pattern in tied and "tied" not in hits:
            hits["tied"] = (n, len(proposals))
        if pattern in top1 and "top1" not in hits:
            hits["top1"] = (n, len(proposals))
            if not noisy:
                break
    if "top1" in hits and not noisy:
        regret += [0.0] * (budget - len(regret))
    else:
        # Budget spent, or the sampler stopped proposing anything new: regret stays.
        regret += [regret[-1]] * (budget - len(regret))
    e1, a1 = hits.get("top1", (None, None))
    e3, a3 = hits.get("top3", (None, None))
    et, _ = hits.get("tied", (None, None))
    return Replay(
        sampler, seed, budget, proposals, regret, e1, e3, a1, a3, list(observed.values()), et, noisy
    )


def _one_thread() -> None:
    # Worker processes: one torch thread each, so N workers use N cores, not N x all.
    import torch

    torch.set_num_threads(1)


def bench(
    table: Table,
    samplers: Sequence[str],
    seeds: Sequence[int],
    budget: int,
    n_startup: int | None = None,
    on_replay: Callable[[Replay], None] | None = None,
    workers: int = 1,
    finished: Sequence[Replay] = (),
) -> dict[str, list[Replay]]:
    """Every sampler over every seed: sampler name -> replays (in seed order).

    ``workers > 1`` runs the replays in that many processes; each replay depends only on
    its sampler and seed, so the results are the same as with one. ``finished`` replays
    (read back from a killed run's log) are kept and not run again; ``on_replay`` is called
    only for the new ones.
    """
    done: dict[tuple[str, int], Replay] = {(r.sampler, r.seed): r for r in finished}
    jobs = [(name, seed) for name in samplers for seed in seeds if (name, seed) not in done]
    if workers <= 1:
        for name, seed in jobs:
            done[(name, seed)] = r = replay(table, name, seed, budget, n_startup)
            if on_replay is not None:
                on_replay(r)
    else:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=workers, initializer=_one_thread) as pool:
            futures = [pool.submit(replay, table, n, s, budget, n_startup) for n, s in jobs]
            for fut in as_completed(futures):
                r = fut.result()
                done[(r.sampler, r.seed)] = r
                if on_replay is not None:
                    on_replay(r)
    return {name: [done[(name, seed)] for seed in seeds] for name in samplers}
