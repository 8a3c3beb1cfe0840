"""Stage ``scale``: the aggregated pattern extrapolated to the target, and its Llama-style
baseline."""

from __future__ import annotations

from typing import Any

from hcomposer.accounting import count_costs, meta_model, params_from_shape
from hcomposer.architecture import Architecture
from hcomposer.data import get_tokenizer
from hcomposer.io import atomic_write_json
from hcomposer.model import HybridLM
from hcomposer.pipeline.state import State
from hcomposer.recipes import Recipe
from hcomposer.scaling.extrapolate import extrapolate
from hcomposer.shapes import resolve_shape
from hcomposer.training.trainer import resolve_arch

__all__ = ["matched_baseline", "stage_scale", "target_architecture", "target_on_meta"]


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


def target_architecture(recipe: Recipe, searched: str, tokenizer: Any = None) -> Architecture:
    """The recipe's target: ``searched`` extrapolated (``scale_strategy``) to ``target_layers``
    sublayers at ``target_shape``; with ``tokenizer``, its vocabulary and the training
    sequence length replace the preset's, as the trained model has them.

    The parameter count follows the tokenizer: the paper recipe's ``llama-3.2-1b`` target has
    Llama-3.2-1B's 1,235,814,400 parameters with Llama 3's 128,256-entry tokenizer, and
    973,801,472 with the byte tokenizer (the embedding table is 263M of the 1.24B).
    """
    shape = resolve_shape(recipe.target_shape)
    layers = recipe.target_layers or shape.n_layers
    arch = Architecture(pattern=extrapolate(searched, layers, recipe.scale_strategy), shape=shape)
    return arch if tokenizer is None else resolve_arch(arch, tokenizer, recipe.train.seq_len)


def target_on_meta(
    recipe: Recipe, searched: str, tokenizer: Any = None
) -> tuple[Architecture, HybridLM, int]:
    """``(architecture, model on the meta device, exact parameter count)`` of the recipe's
    full target (:func:`target_architecture`): its whole structure without its memory (the
    paper recipe's 1.24B-parameter target builds in seconds)."""
    arch = target_architecture(recipe, searched, tokenizer)
    model, params = meta_model(arch)
    return arch, model, params


def stage_scale(state: State, recipe: Recipe, searched: str) -> dict:
    # Match the baseline on the model that is trained: its vocabulary comes from the
    # tokenizer (byte-level: 320 ids), not from the preset's 32K, which would dominate.
    tcfg = recipe.train
    tokenizer = get_tokenizer(tcfg.tokenizer, source=tcfg.data)
    composite = target_architecture(recipe, searched, tokenizer)
    pattern, shape = composite.pattern, composite.shape
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
