"""A recipe's full target on the meta device: its exact structure and parameter count, no memory."""

from __future__ import annotations

import time

import torch

from hcomposer.accounting import params_from_shape
from hcomposer.data import get_tokenizer
from hcomposer.model import build_model
from hcomposer.pipeline import target_architecture, target_on_meta
from hcomposer.recipes import get_recipe
from hcomposer.scaling.extrapolate import extrapolate
from hcomposer.training.config import vocab_for


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_paper_target_is_llama_3_2_1b_on_meta_in_seconds():
    recipe = get_recipe("paper")
    t0 = time.perf_counter()
    # A 16-position A/F winner, stretched to 32 sublayers at the Llama-3.2-1B shape.
    arch, model, params = target_on_meta(recipe, "AF" * 8)
    elapsed = time.perf_counter() - t0
    assert arch.pattern == extrapolate("AF" * 8, 32, "stretch") and arch.n_sublayers == 32
    # Llama-3.2-1B's published count (128,256-entry vocabulary, tied head): 1,235,814,400.
    assert params == 1_235_814_400 == params_from_shape(arch)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.lm_head.weight is model.embed.weight
    assert elapsed < 30, elapsed


def test_meta_count_equals_the_model_built_for_real():
    recipe = get_recipe("quickstart")  # target shape 2m, 12 sublayers, stacked
    tokenizer = get_tokenizer("byte")
    for searched in ("SEAF", "[A|S]DWF", "AFAF"):
        arch, meta, params = target_on_meta(recipe, searched, tokenizer)
        assert arch == target_architecture(recipe, searched, tokenizer)
        assert arch.n_sublayers == 12 and arch.shape.vocab_size == vocab_for(tokenizer) == 320
        real = build_model(arch, seed=0)
        assert params == _count(real) == _count(meta), searched
        # The same structure: every parameter's name and shape.
        assert {n: p.shape for n, p in meta.named_parameters()} == {
            n: p.shape for n, p in real.named_parameters()
        }
