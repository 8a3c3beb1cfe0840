"""Accounting: known answers, counted == built, cache bytes == real cache tensors, FLOPs."""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_MAMBA, tensor_bytes
from hcomposer import Architecture, build_model, count_costs
from hcomposer.shapes import get_shape

TINY = get_shape("tiny")


@pytest.mark.parametrize(
    "pattern, shape, expected",
    [
        ("(AF)*16", "llama-3.2-1b", 1_235_814_400),
        ("(AF)*28", "llama-3.2-3b", 3_212_749_824),
        ("(AF)*32", "llama-3.1-8b", 8_030_261_248),
    ],
)
def test_real_llama_parameter_counts(pattern, shape, expected):
    costs = count_costs(Architecture.parse(pattern, shape=shape))
    assert costs.params_total == expected
    assert costs.params_active == expected
    s = get_shape(shape)
    assert costs.params_embedding == s.vocab_size * s.d_model * (1 if s.tie_embeddings else 2)
    assert costs.params_non_embedding == expected - costs.params_embedding


def _tiny_patterns() -> list[str]:
    base = ["A", "W", "F", "E", "AF", "[A|W]F", "WE[W|A]", "(AE)*2"]
    if HAS_MAMBA:
        base += ["S", "SF", "[A|S]E", "[S|W]F[A|S]"]
    return base


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("pattern", _tiny_patterns())
def test_counted_params_equal_built_model(pattern, tie):
    shape = TINY.replace(tie_embeddings=tie)
    arch = Architecture.parse(pattern, shape=shape)
    costs = count_costs(arch)
    model = build_model(arch, seed=0)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert costs.params_total == sum(unique.values())
    assert costs.params_embedding == shape.vocab_size * shape.d_model * (1 if tie else 2)
    experts = sum(
        (m.n_experts - m.top_k) * sum(p.numel() for p in m.experts[0].parameters())
        for m in model.modules()
        if type(m).__name__ == "MixtureOfExperts"
    )
    assert costs.params_active == costs.params_total - experts


@pytest.mark.parametrize("pattern", _tiny_patterns() + ["AWAW", "[A|W][W|A]E"])
def test_cache_bytes_equal_real_cache_tensors(pattern):
    arch = Architecture.parse(pattern, shape=TINY)
    model = build_model(arch, seed=0)
    costs = count_costs(arch, dtype_bytes=4)  # the fp32 model's caches
    batch, max_len = 3, 40
    cache = model.init_cache(batch, max_len)
    assert tensor_bytes(cache.layers) == batch * (
        max_len * costs.kv_bytes_per_token + costs.state_bytes
    )
    # Decoding does not change any cache's size.
    model(torch.zeros(batch, max_len, dtype=torch.long), cache=cache)
    assert tensor_bytes(cache.layers) == batch * (
        max_len * costs.kv_bytes_per_token + costs.state_bytes
    )


def test_kv_and_state_hand_formulas():
    s = TINY
    kv_layer = 2 * s.n_kv_heads * s.head_dim * 2  # K and V, bf16
    costs = count_costs(Architecture.parse("AFWF[A|W]", shape=s))
    # A: full heads; the group's A branch holds half the KV heads.
    assert costs.kv_bytes_per_token == kv_layer + kv_layer // 2
    assert costs.state_bytes == kv_layer * s.window + (kv_layer // 2) * s.window
    assert count_costs(Architecture.parse("FEF", shape=s)).kv_bytes_per_token == 0


@pytest.mark.parametrize("seq_len", [1, 16, 100])
def test_flops_hand_formula_plain_transformer(seq_len):
    s = TINY.replace(tie_embeddings=False)
    costs = count_costs(Architecture.parse("AFWF", shape=s), seq_len=seq_len)
    d, hd = s.d_model, s.head_dim
    attn_params = d * hd * (2 * s.n_heads + 2 * s.n_kv_heads)
    mlp_params = 3 * d * s.ffn_dim
    head = d * s.vocab_size
    # The 2N convention: every active non-embedding parameter (norm scales too) costs 2 FLOPs.
    norms = 5 * d
    matmul = 2 * (2 * attn_params + 2 * mlp_params + head + norms)
    # Scores and weighted values: 4 * heads * head_dim per visible key, averaged over queries.
    full_visible = (seq_len + 1) / 2
    win_visible = sum(min(i + 1, s.window) for i in range(seq_len)) / seq_len
    extra = 4 * s.n_heads * hd * (full_visible + win_visible)
    assert costs.flops_per_token == pytest.approx(matmul + extra, rel=1e-12)
    assert costs.seq_len == seq_len


def test_meta_device_builds_nothing():
    model = build_model("(AF)*32", shape="llama-3.1-8b", device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())


def test_costs_to_dict_has_the_cli_keys():
    d = count_costs(Architecture.parse("AFE", shape=TINY)).to_dict()
    for key in (
        "pattern",
        "params_total",
        "params_active",
        "params_embedding",
        "flops_per_token",
        "kv_bytes_per_token",
        "state_bytes",
    ):
        assert key in d
    assert d["counts"] == {"A": 1, "F": 1, "E": 1}
