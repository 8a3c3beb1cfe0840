"""The size ladder of an IsoFLOP sweep and the runs a sweep plans.

A size is a width ``d_model``; everything else follows from it by one rule (``Ladder``):

- heads at a fixed head dimension: ``n_heads = d_model / head_dim`` (an even width below the
  head dimension gets one head that wide, for the tiniest CPU rungs); grouped-query attention
  with up to ``kv_group`` query heads per key/value head (the largest of kv_group, ..., 1 that
  divides the head count; Llama 3.2 uses 4);
- ``ffn_dim = 8/3 d_model`` rounded to a multiple of ``ffn_multiple`` (SwiGLU keeps the
  parameters of a 4d MLP with three matrices; Llama's rule);
- depth: ``blocks = max(min_blocks, round(d_model / aspect))`` attention+MLP blocks, i.e. the
  reference (Llama-style) model has ``2 * blocks`` sublayers at this width, a fixed
  width-to-depth ratio as in Chinchilla's and Llama's ladders;
- the pattern: the searched block is extrapolated to exactly those ``2 * blocks`` sublayers by
  ``hcomposer.scaling.extrapolate`` (``stack`` by default: Composer stacks short searched
  blocks such as ``AAFFFF`` and stretches long ones). So ``AF`` gives ``(AF)*blocks``, and a
  composite has the baseline's depth at every width and differs only in which primitive sits
  where -- the comparison Composer makes.

All other shape fields come from a base preset (``proxy``), with the vocabulary set from the
tokenizer and ``max_seq_len`` from the training length, so the model counted is the model
trained.

Tokens per run: training costs 3 forward passes' worth of FLOPs per token (forward, and a
backward of twice the forward). With ``F`` the forward FLOPs per token of
``hcomposer.accounting.count_costs`` at the training length (2 x matmul parameters, output
head included, plus attention's scores and weighted sum), a run at budget ``C`` trains
``steps = max(1, round(C / (3 F * tokens_per_step)))`` optimiser steps, i.e.
``D = steps * batch_size * seq_len`` tokens, and spends ``3 F D`` FLOPs: ``C`` to within half
a step. ``3 F`` is the familiar ``6N`` plus attention. Evaluation passes are not counted.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.errors import UserError
from hcomposer.pattern import canonical
from hcomposer.scaling.extrapolate import STRATEGIES, extrapolate
from hcomposer.shapes import Shape, get_shape

__all__ = ["Ladder", "PlannedRun", "shape_for", "pattern_block", "plan_runs", "run_key"]


@dataclass(frozen=True, kw_only=True)
class Ladder:
    """How a width becomes a model (see the module docstring)."""

    head_dim: int = 16
    aspect: int = 32
    min_blocks: int = 2
    kv_group: int = 2
    ffn_multiple: int = 16
    strategy: str = "stack"
    base: str = "proxy"

    def __post_init__(self) -> None:
        for name in ("head_dim", "aspect", "min_blocks", "kv_group", "ffn_multiple"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"ladder: {name} must be a positive integer (got {v!r})")
        if self.head_dim % 2:
            raise UserError(f"ladder: head_dim {self.head_dim} must be even (rotary embeddings)")
        if self.strategy not in STRATEGIES:
            raise UserError(f"ladder: strategy {self.strategy!r}; choose one of {STRATEGIES}")
        get_shape(self.base)

    def blocks(self, d_model: int) -> int:
        # floor(x + 0.5): round half up, so widths on a half step do not alternate.
        return max(self.min_blocks, math.floor(d_model / self.aspect + 0.5))

    def to_dict(self) -> dict:
        return asdict(self)


def shape_for(d_model: int, ladder: Ladder, vocab_size: int, seq_len: int) -> Shape:
    """The shape of the ladder's rung of width ``d_model``."""
    small = isinstance(d_model, int) and 2 <= d_model < ladder.head_dim and d_model % 2 == 0
    if not small and (
        not isinstance(d_model, int) or d_model < ladder.head_dim or d_model % ladder.head_dim
    ):
        raise UserError(
            f"size {d_model!r}: a width must be a positive multiple of the head dimension "
            f"{ladder.head_dim} (or an even width below it: one head that wide)"
        )
    head_dim = d_model if small else ladder.head_dim
    heads = d_model // head_dim
    group = next(g for g in range(ladder.kv_group, 0, -1) if heads % g == 0)
    ffn = max(
        ladder.ffn_multiple, round(8 * d_model / 3 / ladder.ffn_multiple) * ladder.ffn_multiple
    )
    base = get_shape(ladder.base)
    ssm_head = math.gcd(base.ssm_head_dim, 2 * d_model)
    return base.replace(
        name=f"isoflop-d{d_model}",
        d_model=d_model,
        n_heads=heads,
        n_kv_heads=heads // group,
        head_dim=head_dim,
        ffn_dim=ffn,
        expert_ffn_dim=max(1, ffn // 2),
        vocab_size=vocab_size,
        max_seq_len=seq_len,
        n_layers=2 * ladder.blocks(d_model),
        ssm_head_dim=ssm_head,
    )


def pattern_block(text: str) -> str:
    """The searched block of a pattern argument: ``(AF)*n`` and ``AF*n`` mean the block ``AF``
    (its depth comes from the ladder); any other pattern is the block itself."""
    t = re.sub(r"\s+", "", str(text))
    m = re.fullmatch(r"\((.+)\)\*n|(.+)\*n", t)
    if m:
        t = m.group(1) or m.group(2)
    return canonical(t)


def run_key(block: str, budget: float, d_model: int) -> str:
    """The run folder (relative to the sweep folder) of one (pattern, budget, size)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", block).strip("_") or "p"
    if slug != block:
        # Two patterns that differ only in punctuation ([A|S]F vs A_SF) must not share a folder.
        slug += "-" + hashlib.sha1(block.encode()).hexdigest()[:6]
    return f"runs/{slug}/C{budget:.3g}".replace("+", "") + f"/d{d_model}"


@dataclass(frozen=True)
class PlannedRun:
    """One training run of a sweep: its architecture, size, FLOPs and tokens."""

    block: str
    budget: float
    d_model: int
    arch: Architecture
    params: int
    flops_per_token: float  # training: 3 x the forward FLOPs per token
    steps: int
    tokens: int
    key: str

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    def describe(self) -> dict:
        return {
            "pattern": self.block,
            "model": self.arch.pattern,
            "budget": self.budget,
            "d_model": self.d_model,
            "n_sublayers": self.arch.n_sublayers,
            "params": self.params,
            "train_flops_per_token": self.flops_per_token,
            "steps": self.steps,
            "tokens": self.tokens,
            "flops": self.flops,
            "tokens_per_param": self.tokens_per_param,
            "key": self.key,
        }


def plan_runs(
    blocks: Sequence[str],
    budgets: Sequence[float],
    sizes: Sequence[int],
    ladder: Ladder,
    *,
    vocab_size: int,
    seq_len: int,
    tokens_per_step: int,
    tokens_per_param: tuple[float, float] | None = None,
) -> list[PlannedRun]:
    """Every run of the sweep, checked: each budget keeps the sizes whose tokens per parameter
    lie in ``tokens_per_param`` (all sizes when None) and must keep at least three."""
    archs: dict[tuple[str, int], tuple[Architecture, int, float]] = {}
    for block in blocks:
        for d in sizes:
            shape = shape_for(d, ladder, vocab_size, seq_len)
            pattern = extrapolate(block, shape.n_layers, ladder.strategy)
            arch = Architecture(pattern=pattern, shape=shape)
            costs = count_costs(arch, seq_len)
            archs[block, d] = (arch, costs.params_total, 3.0 * costs.flops_per_token)
    runs: list[PlannedRun] = []
    for block in blocks:
        for budget in budgets:
            kept = []
            for d in sizes:
                arch, params, fpt = archs[block, d]
                steps = round(budget / (fpt * tokens_per_step))
                tokens = steps * tokens_per_step
                if tokens_per_param is not None:
                    lo, hi = tokens_per_param
                    if not lo <= tokens / params <= hi:
                        continue
                if steps < 1:
                    raise UserError(
                        f"budget {budget:.3g} is less than half an optimiser step of {block} at "
                        f"width {d} ({fpt * tokens_per_step:.3g} FLOPs); raise the budget or "
                        "drop the size"
                    )
                kept.append(
                    PlannedRun(
                        block,
                        budget,
                        d,
                        arch,
                        params,
                        fpt,
                        steps,
                        tokens,
                        run_key(block, budget, d),
                    )
                )
            if len(kept) < 3:
                window = ""
                if tokens_per_param is not None:
                    lo, hi = tokens_per_param
                    window = f" with {lo:g}-{hi:g} tokens per parameter"
                raise UserError(
                    f"budget {budget:.3g} keeps {len(kept)} size(s) of {block}{window}; a "
                    "parabola needs at least 3: add sizes or widen --tokens-per-param"
                )
            runs.extend(kept)
    return runs
