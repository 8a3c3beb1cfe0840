"""Stage ``scale``: the aggregated pattern extrapolated to the target, and its Llama-style
baseline."""

from __future__ import annotations

from hcomposer.accounting import count_costs, params_from_shape
from hcomposer.architecture import Architecture
from hcomposer.data import get_tokenizer
from hcomposer.io import atomic_write_json
from hcomposer.pipeline.state import State
from hcomposer.recipes import Recipe
from hcomposer.scaling.extrapolate import extrapolate
from hcomposer.shapes import resolve_shape
from hcomposer.training.trainer import resolve_arch

__all__ = ["matched_baseline", "stage_scale"]


def matched_baseline(params: int, shape) -> tuple[str, int]:
    """The Llama-style ``(AF)*n`` at ``shape`` whose parameter count is closest to ``params``."""
    best: tuple[int, str, int] | None = None
    n = 1
    while True:
        pattern = "AF" * n
        # Exact without building a model (tests/test_accounting.py).
        total = params_from_shape(Architecture(pattern=pattern, shape=shape))
        gap = abs(total - params)
        if best is None or gap < best[0]:
            best = (gap, pattern, total)
        if total > params:
            break
        n += 1
    return best[1], best[2]


def stage_scale(state: State, recipe: Recipe, searched: str) -> dict:
    shape = resolve_shape(recipe.target_shape)
    layers = recipe.target_layers or shape.n_layers
    pattern = extrapolate(searched, layers, recipe.scale_strategy)
    # Match the baseline on the model that is trained: its vocabulary comes from the
    # tokenizer (byte-level: 320 ids), not from the preset's 32K, which would dominate.
    tcfg = recipe.train
    tokenizer = get_tokenizer(tcfg.tokenizer, source=tcfg.data)
    composite = resolve_arch(Architecture(pattern=pattern, shape=shape), tokenizer, tcfg.seq_len)
    shape = composite.shape
    params = count_costs(composite).params_total
    base_pattern, base_params = matched_baseline(params, shape)
    baseline = Architecture(pattern=base_pattern, shape=shape)
    atomic_write_json(state.dir.architecture("composite"), composite.to_dict())
    atomic_write_json(state.dir.architecture("baseline"), baseline.to_dict())
    return state.finish(
        "scale",
        {
            "searched": searched,
            "strategy": recipe.scale_strategy,
            "composite": pattern,
            "composite_params": params,
            "baseline": base_pattern,
            "baseline_params": base_params,
        },
    )
