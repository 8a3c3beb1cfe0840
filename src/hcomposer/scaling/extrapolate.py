"""Extrapolation: grow a searched block to a target depth or parameter count (Composer).

- ``stretch(pattern, L)``: cut the pattern into maximal runs of one sublayer and scale
  every run length by s = L / l, keeping the order of transitions. Each run gets
  ``ceil(r * s)`` sublayers (the paper rounds up); the surplus is then trimmed one
  sublayer at a time from the run whose rounding added the most (largest
  ``n - r * s``), ties to the longer run, then to the later run, never below one
  sublayer. For s >= 1 every run ends within one sublayer of ``r * s``.
- ``stack(pattern, L)``: repeat the block ``L // l`` times and fill the remaining
  ``L % l`` positions with a copy of the block stretched (shrunk) to that length. When
  the remainder is shorter than the number of runs, not every run can keep a
  sublayer: the remainder keeps the runs with the largest share ``r * s`` (ties to the
  earlier run), in their order.
- ``L`` smaller than the pattern is a shrink by the same rule; ``stretch`` refuses an
  ``L`` below the number of runs (a transition would be lost).

``scale_to_params`` solves for the depth whose total parameter count (counted on the
meta device by ``hcomposer.accounting.count_costs``) is closest to a target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.errors import UserError
from hcomposer.pattern import Sublayer, format_pattern, parse_pattern
from hcomposer.shapes import Shape, resolve_shape

__all__ = [
    "STRATEGIES",
    "runs",
    "stretch",
    "stack",
    "extrapolate",
    "params_at_depth",
    "scale_to_params",
]

STRATEGIES = ("stack", "stretch")

# Parser's own expansion cap: no pattern may exceed it.
_MAX_SUBLAYERS = 100_000
# A parameter target needing deeper models than this almost surely means a too-narrow shape
# (and counting such a model on the meta device takes minutes).
_MAX_DEPTH_FOR_PARAMS = 10_000


def _layers(pattern: str | Sequence[Sublayer]) -> list[Sublayer]:
    return parse_pattern(pattern) if isinstance(pattern, str) else parse_pattern(list(pattern))


def runs(pattern: str | Sequence[Sublayer]) -> list[tuple[Sublayer, int]]:
    """Maximal runs of one sublayer: ``AAFFFF`` -> ``[(("A",), 2), (("F",), 4)]``."""
    out: list[tuple[Sublayer, int]] = []
    for s in _layers(pattern):
        if out and out[-1][0] == s:
            out[-1] = (s, out[-1][1] + 1)
        else:
            out.append((s, 1))
    return out


def _check_length(L: int) -> None:
    if not isinstance(L, int) or isinstance(L, bool) or L < 1:
        raise UserError(f"target depth must be a whole number of sublayers >= 1 (got {L!r})")
    if L > _MAX_SUBLAYERS:
        raise UserError(f"target depth {L} exceeds the limit of {_MAX_SUBLAYERS} sublayers")


def _scaled_lengths(lengths: list[int], L: int) -> list[int]:
    """Run lengths scaled to total exactly ``L`` (L >= len(lengths)); see the module docstring."""
    total = sum(lengths)
    exact = [r * L / total for r in lengths]
    n = [max(1, math.ceil(x - 1e-9)) for x in exact]
    while sum(n) > L:
        # Largest rounding surplus first; then longer run; then later run.
        i = max(
            (i for i in range(len(n)) if n[i] > 1),
            key=lambda i: (n[i] - exact[i], n[i], i),
        )
        n[i] -= 1
    return n


def stretch(pattern: str | Sequence[Sublayer], L: int) -> str:
    """Scale every run of ``pattern`` by L / len(pattern); exactly ``L`` sublayers.

    >>> stretch("AAFFFF", 12)
    'AAAAFFFFFFFF'
    """
    _check_length(L)
    rs = runs(pattern)
    if len(rs) > L:
        raise UserError(
            f"cannot stretch {format_pattern(_layers(pattern))!r} ({len(rs)} runs) to {L} "
            f"sublayers without losing a transition; use at least {len(rs)}"
        )
    lengths = _scaled_lengths([n for _, n in rs], L)
    return format_pattern([s for (s, _), n in zip(rs, lengths) for _ in range(n)])


def _shrink_remainder(rs: list[tuple[Sublayer, int]], r: int) -> list[Sublayer]:
    if r >= len(rs):
        lengths = _scaled_lengths([n for _, n in rs], r)
        return [s for (s, _), n in zip(rs, lengths) for _ in range(n)]
    # Fewer positions than runs: keep the r largest runs (earlier wins ties), in order.
    order = sorted(range(len(rs)), key=lambda i: (-rs[i][1], i))[:r]
    return [rs[i][0] for i in sorted(order)]


def stack(pattern: str | Sequence[Sublayer], L: int) -> str:
    """Repeat ``pattern`` L // l times, then a copy stretched to L % l; exactly ``L``.

    >>> stack("AAFFFF", 12)
    'AAFFFFAAFFFF'
    """
    _check_length(L)
    layers = _layers(pattern)
    q, r = divmod(L, len(layers))
    out = layers * q
    if r:
        out += _shrink_remainder(runs(layers), r)
    return format_pattern(out)


def extrapolate(pattern: str | Sequence[Sublayer], L: int, strategy: str = "stack") -> str:
    """``stack`` or ``stretch`` by name."""
    if strategy == "stack":
        return stack(pattern, L)
    if strategy == "stretch":
        return stretch(pattern, L)
    raise UserError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def _per_sublayer_params(layers: Sequence[Sublayer], shape: Shape) -> tuple[int, dict]:
    """Parameters outside the sublayers (embedding, head, final norm) and per distinct sublayer.

    A model's parameter count is that base plus one term per sublayer, so two meta-device
    counts per distinct sublayer (``s`` and ``ss``) give both terms exactly.
    """
    per: dict[Sublayer, int] = {}
    base = None
    for s in dict.fromkeys(layers):
        one = count_costs(Architecture(pattern=format_pattern([s]), shape=shape)).params_total
        two = count_costs(Architecture(pattern=format_pattern([s, s]), shape=shape)).params_total
        per[s] = two - one
        base = one - per[s]
    return int(base), per


def _grown_counts(rs: list[tuple[Sublayer, int]], L: int, strategy: str) -> dict:
    """Sublayer counts of the extrapolation to ``L`` without building the string (O(runs))."""
    counts: dict[Sublayer, int] = {}
    if strategy == "stretch":
        parts = zip([s for s, _ in rs], _scaled_lengths([n for _, n in rs], L))
    else:
        q, r = divmod(L, sum(n for _, n in rs))
        parts = [(s, q * n) for s, n in rs] + [
            (s, 1) for s in (_shrink_remainder(rs, r) if r else [])
        ]
    for s, n in parts:
        counts[s] = counts.get(s, 0) + n
    return counts


def params_at_depth(
    pattern: str | Sequence[Sublayer], L: int, shape: str | Shape, strategy: str = "stack"
) -> int:
    """Total parameters of ``pattern`` extrapolated to ``L`` sublayers at ``shape``."""
    arch = Architecture(pattern=extrapolate(pattern, L, strategy), shape=resolve_shape(shape))
    return count_costs(arch).params_total


def scale_to_params(
    pattern: str | Sequence[Sublayer],
    params: int | float,
    shape: str | Shape = "llama-3.2-1b",
    strategy: str = "stack",
) -> Architecture:
    """The extrapolation of ``pattern`` whose total parameters are closest to ``params``.

    Scans depths upwards from 1 with a per-sublayer cost model (exact: parameters are a
    base plus one term per sublayer, both measured with ``count_costs`` on the meta
    device) and stops once even the cheapest sublayer cannot come back within the best
    distance found; ties go to the shallower model. The result is re-counted with
    ``count_costs`` and checked against the model.
    """
    shape = resolve_shape(shape)
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not params or params <= 0:
        raise UserError(f"parameter target must be positive (got {params!r})")
    layers = _layers(pattern)
    base, per = _per_sublayer_params(layers, shape)
    cheapest = min(per.values())
    rs = runs(layers)
    best_L, best_gap = None, math.inf
    for L in range(1, _MAX_DEPTH_FOR_PARAMS + 2):
        # Every extra sublayer adds at least `cheapest`: past this point no depth can win.
        if base + L * cheapest - params > best_gap:
            break
        if strategy == "stretch" and len(rs) > L:
            continue
        total = base + sum(per[s] * n for s, n in _grown_counts(rs, L, strategy).items())
        gap = abs(total - params)
        if gap < best_gap:
            best_L, best_gap = L, gap
    if best_L is None or best_L > _MAX_DEPTH_FOR_PARAMS:
        raise UserError(
            f"{params:.4g} parameters would need more than {_MAX_DEPTH_FOR_PARAMS} sublayers of "
            f"{format_pattern(layers)!r} at shape {shape.name!r}; choose a wider --shape"
        )
    arch = Architecture(pattern=extrapolate(layers, best_L, strategy), shape=shape)
    predicted = base + sum(per[s] for s in arch.layers)
    counted = count_costs(arch).params_total
    if counted != predicted:
        raise RuntimeError(
            f"parameter model disagrees with count_costs for {arch.pattern}: "
            f"{predicted} != {counted}"
        )
    return arch
