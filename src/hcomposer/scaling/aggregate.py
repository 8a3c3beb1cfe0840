"""Aggregation: turn the top trials of a search into one pattern (Composer's aggregator).

The recipe (Composer, arXiv 2025): cluster the trial scores with k-means (k=5), keep
the cluster with the highest mean score, then choose every position by a vote among
the kept candidates:

- ``n0``: the most common sublayer at that position among all kept candidates;
- ``nc``: the most common sublayer among the kept candidates whose previous ``c``
  positions equal the ``c`` positions already chosen (at position ``i < c`` the
  prefix that exists is compared). Some kept candidate always agrees: the one whose
  choice won the previous position agrees with every position before it that it was
  compared on, so no fallback is needed (if one were, it would be the ``n0`` vote;
  the code raises if it ever is);
- ``best``: the single best candidate, no vote.

Decisions the paper leaves open, made here:

- k-means is an exact 1-D k-means (dynamic programming over the sorted distinct
  scores, weighted by how often each occurs): deterministic, globally optimal, and
  equal scores always share a cluster. ``k`` shrinks to the number of distinct scores.
- A pattern evaluated in several trials (a sampler proposing it again, or several
  seeds) is one candidate with the mean of its scores, so a sampler that keeps
  re-proposing a pattern does not multiply its vote.
- Vote ties go to the choice held by the best-scoring candidate (candidates are ranked
  by score, then by the earliest trial number).
- A group such as ``[A|S]`` is one position and one choice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hcomposer.errors import UserError
from hcomposer.io import pick
from hcomposer.pattern import Sublayer, format_pattern, parse_pattern

__all__ = [
    "METHODS",
    "Candidate",
    "Aggregation",
    "completed_candidates",
    "kmeans_1d",
    "aggregate",
    "aggregate_details",
]

METHODS = ("n0", "nc", "best")

# Optuna's TrialState name and the plain words a trials.jsonl may use.
_DONE_STATES = frozenset({"complete", "completed", "done"})


@dataclass(frozen=True)
class Candidate:
    """One distinct pattern among the completed trials, with its mean score."""

    pattern: str
    layers: tuple[Sublayer, ...]
    score: float
    n_trials: int
    first_trial: int

    def to_dict(self) -> dict[str, Any]:
        return pick(self, "pattern", "score", "n_trials", "first_trial")


@dataclass(frozen=True)
class Aggregation:
    """The aggregated pattern and how it was reached (the ``--json`` of ``aggregate``)."""

    pattern: str
    method: str
    c: int
    k: int
    kept: list[Candidate]
    votes: list[dict[str, Any]]
    clusters: list[dict[str, Any]]
    n_trials: int
    n_candidates: int
    best: Candidate

    def to_dict(self) -> dict[str, Any]:
        return {
            **pick(self, "pattern", "method", "c", "k", "n_trials", "n_candidates"),
            "best": self.best.to_dict(),
            "kept": [c.to_dict() for c in self.kept],
            "clusters": self.clusters,
            "votes": self.votes,
        }


def _field(trial: Any, name: str, default: Any = None) -> Any:
    if isinstance(trial, Mapping):
        return trial.get(name, default)
    return getattr(trial, name, default)


def _state_done(state: Any) -> bool:
    # None means the caller passed plain (pattern, score) records: treat as done.
    if state is None:
        return True
    name = getattr(state, "name", state)
    return str(name).strip().lower() in _DONE_STATES


def _as_score(value: Any) -> float | None:
    # Multi-objective records may carry a list; the first objective is the proxy score.
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None or isinstance(value, bool):
        return None
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    return score if math.isfinite(score) else None


def completed_candidates(trials: Iterable[Any]) -> tuple[list[Candidate], int]:
    """Distinct patterns of the completed, scored trials, best first; and the trial count.

    A trial is a mapping (or object) with ``pattern``, ``score`` and optionally ``state``
    and ``number``. Failed, pruned, running or unscored trials are skipped. Patterns of
    different lengths raise UserError.
    """
    sums: dict[str, list[float]] = {}
    first: dict[str, int] = {}
    layers_of: dict[str, tuple[Sublayer, ...]] = {}
    n_used = 0
    for i, t in enumerate(trials):
        if not _state_done(_field(t, "state")):
            continue
        score = _as_score(_field(t, "score"))
        text = _field(t, "pattern")
        if score is None or not text:
            continue
        layers = tuple(parse_pattern(str(text)))
        key = format_pattern(layers)
        number = _field(t, "number")
        number = i if number is None else int(number)
        n_used += 1
        sums.setdefault(key, []).append(score)
        layers_of[key] = layers
        first[key] = min(first.get(key, number), number)
    lengths = {len(v) for v in layers_of.values()}
    if len(lengths) > 1:
        raise UserError(
            f"trials hold patterns of different lengths {sorted(lengths)}; aggregation votes "
            "per position, so aggregate one search (one length) at a time"
        )
    cands = [Candidate(k, layers_of[k], sum(v) / len(v), len(v), first[k]) for k, v in sums.items()]
    cands.sort(key=lambda c: (-c.score, c.first_trial))
    return cands, n_used


def kmeans_1d(values: list[float], k: int) -> list[int]:
    """Exact 1-D k-means: a cluster label per value, 0 = lowest-mean cluster.

    Dynamic programming over the sorted distinct values (weighted by multiplicity)
    minimises the within-cluster sum of squares exactly, so the answer does not depend
    on initialisation. ``k`` is reduced to the number of distinct values.
    """
    if not values:
        return []
    distinct = sorted(set(values))
    weight = [0] * len(distinct)
    index = {v: i for i, v in enumerate(distinct)}
    for v in values:
        weight[index[v]] += 1
    m = len(distinct)
    k = max(1, min(k, m))
    # Prefix sums of w, w*x, w*x^2 give any segment's sum of squares in O(1).
    pw, px, pxx = [0.0], [0.0], [0.0]
    for x, w in zip(distinct, weight):
        pw.append(pw[-1] + w)
        px.append(px[-1] + w * x)
        pxx.append(pxx[-1] + w * x * x)

    def sse(i: int, j: int) -> float:  # distinct[i:j]
        w = pw[j] - pw[i]
        s = px[j] - px[i]
        return max(0.0, (pxx[j] - pxx[i]) - s * s / w)

    inf = float("inf")
    # cost[q][j]: best cost of the first j values in q+1 clusters; cut[q][j]: start of the last.
    cost = [[inf] * (m + 1) for _ in range(k)]
    cut = [[0] * (m + 1) for _ in range(k)]
    for j in range(1, m + 1):
        cost[0][j] = sse(0, j)
    for q in range(1, k):
        for j in range(q + 1, m + 1):
            best, arg = inf, q
            for i in range(q, j):
                c = cost[q - 1][i] + sse(i, j)
                # Strict '<' keeps the earliest cut among equal costs: deterministic.
                if c < best:
                    best, arg = c, i
            cost[q][j], cut[q][j] = best, arg
    starts = []
    j = m
    for q in range(k - 1, 0, -1):
        i = cut[q][j]
        starts.append(i)
        j = i
    bounds = [0, *reversed(starts), m]
    label_of = {}
    for lab in range(k):
        for i in range(bounds[lab], bounds[lab + 1]):
            label_of[distinct[i]] = lab
    return [label_of[v] for v in values]


def _vote(cands: list[Candidate], pos: int) -> tuple[Sublayer, dict[str, int]]:
    """Majority choice at ``pos``; a tie goes to the best-ranked candidate's choice.

    ``cands`` is ranked best first, so the first candidate holding a tied choice decides.
    """
    counts: dict[Sublayer, int] = {}
    rank: dict[Sublayer, int] = {}
    for r, c in enumerate(cands):
        s = c.layers[pos]
        counts[s] = counts.get(s, 0) + 1
        rank.setdefault(s, r)
    choice = min(counts, key=lambda s: (-counts[s], rank[s]))
    return choice, {format_pattern([s]): n for s, n in counts.items()}


def aggregate_details(
    trials: Iterable[Any], method: str = "n0", c: int = 1, k: int = 5
) -> Aggregation:
    """Aggregate completed trials into one pattern and say how (see the module docstring)."""
    if method not in METHODS:
        raise UserError(
            f"unknown aggregation method {method!r}; choose one of {', '.join(METHODS)}"
        )
    if c < 1:
        raise UserError(f"--c must be at least 1 (got {c}): nc compares the previous c positions")
    if k < 1:
        raise UserError(f"k must be at least 1 (got {k})")
    cands, n_trials = completed_candidates(trials)
    if not cands:
        raise UserError("no completed trials with a score to aggregate; run or finish a search")
    scores = [x.score for x in cands]
    labels = kmeans_1d(scores, k)
    n_clusters = max(labels) + 1
    clusters = []
    for lab in range(n_clusters):
        members = [x.score for x, l in zip(cands, labels) if l == lab]
        clusters.append(
            {
                "size": len(members),
                "mean": sum(members) / len(members),
                "min": min(members),
                "max": max(members),
            }
        )
    top = n_clusters - 1  # labels are ordered by score, so the last has the highest mean
    kept = [x for x, l in zip(cands, labels) if l == top]
    n_pos = len(kept[0].layers)

    votes: list[dict[str, Any]] = []
    if method == "best":
        chosen = list(cands[0].layers)
    else:
        chosen = []
        for pos in range(n_pos):
            pool = kept
            if method == "nc" and pos > 0:
                lo = max(0, pos - c)
                prefix = tuple(chosen[lo:pos])
                pool = [x for x in kept if x.layers[lo:pos] == prefix]
                # The winner of the previous position agrees by construction (docstring).
                if not pool:
                    # Checked even under ``python -O`` (an assert would vanish there).
                    raise RuntimeError("nc: no kept candidate agrees with the chosen prefix")
            choice, counts = _vote(pool, pos)
            chosen.append(choice)
            votes.append(
                {
                    "position": pos + 1,
                    "choice": format_pattern([choice]),
                    "votes": counts,
                    "voters": len(pool),
                }
            )
    return Aggregation(
        pattern=format_pattern(chosen),
        method=method,
        c=c,
        k=k,
        kept=kept,
        votes=votes,
        clusters=clusters,
        n_trials=n_trials,
        n_candidates=len(cands),
        best=cands[0],
    )


def aggregate(trials: Iterable[Any], method: str = "n0", c: int = 1, k: int = 5) -> str:
    """The aggregated pattern of ``trials`` by ``method`` (``n0``, ``nc`` or ``best``).

    >>> aggregate([{"pattern": "AF", "score": 1.0}, {"pattern": "AA", "score": 0.2}], "best")
    'AF'
    """
    return aggregate_details(trials, method=method, c=c, k=k).pattern
