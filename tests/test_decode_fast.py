"""The single-token decode paths against the reference paths (reference_decoding) and SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import decode_stepwise
from hcomposer import build_model
from hcomposer.primitives.attention import Attention, decode_attention
from hcomposer.primitives.decoding import fast_decoding, reference_decoding
from hcomposer.primitives.mamba2 import Mamba2
from hcomposer.shapes import get_shape

TINY = get_shape("tiny")


def _qkv(B, H, Hkv, L, hd, dtype, by_position: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, hd, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, hd, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, hd, generator=g, dtype=torch.float64)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if by_position:
        # The KVCache layout: [B, Hkv, hd, L + slack] storage, viewed [B, Hkv, L, hd].
        def relayout(t):
            store = torch.zeros(B, Hkv, hd, L + 5, dtype=dtype)
            store[..., :L] = t.transpose(-1, -2)
            return store[..., :L].transpose(-1, -2)

        k, v = relayout(k), relayout(v)
        assert k.stride(-2) == 1 and v.stride(-2) == 1
    return q, k, v


@pytest.mark.parametrize("by_position", [True, False])
@pytest.mark.parametrize("B, H, Hkv, L", [(1, 4, 2, 37), (2, 4, 4, 1), (3, 6, 2, 300)])
def test_decode_attention_equals_sdpa_in_fp64(by_position, B, H, Hkv, L):
    q, k, v = _qkv(B, H, Hkv, L, 16, torch.float64, by_position)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=Hkv != H)
    torch.testing.assert_close(decode_attention(q, k, v), ref, rtol=1e-12, atol=1e-12)


def test_decode_attention_bf16_error_is_bf16_rounding():
    q, k, v = _qkv(1, 4, 2, 2048, 64, torch.bfloat16, True, seed=3)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    ours = (decode_attention(q, k, v).double() - exact).abs().max()
    sdpa = (F.scaled_dot_product_attention(q, k, v, enable_gqa=True).double() - exact).abs().max()
    # Scores rounded to bf16 before the softmax: a few bf16 ulps more than SDPA, not more.
    assert ours < 8 * sdpa + 1e-3, (ours, sdpa)


def test_decode_attention_gradients_equal_sdpa():
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 2, 19, 8, torch.float64, False))
    w = torch.randn(2, 4, 1, 8, dtype=torch.float64)
    (decode_attention(q, k, v) * w).sum().backward()
    ours = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (F.scaled_dot_product_attention(q, k, v, enable_gqa=True) * w).sum().backward()
    for a, b in zip(ours, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_cache_layout_follows_the_switch():
    prim = Attention(TINY)
    fast = prim.init_cache(2, 10)
    with reference_decoding():
        assert not fast_decoding()
        ref = prim.init_cache(2, 10)
    assert fast_decoding()
    assert fast.k.shape == ref.k.shape == (2, TINY.n_kv_heads, 10, TINY.head_dim)
    assert fast.v.stride(-2) == 1 and ref.v.stride(-1) == 1 and ref.v.stride(-2) != 1


@pytest.mark.parametrize("pattern", ["AFAF", "SFSF", "AFSF", "A[A|S]F", "WAS", "AF[A|W]F", "[A|S]"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_decoding_equals_reference_decoding(pattern, dtype):
    model = build_model(pattern, shape="tiny", seed=1, dtype=dtype).eval()
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, TINY.vocab_size, (2, 23), generator=g)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    with torch.no_grad():
        fast = decode_stepwise(model, tokens, prefill=5)
        with reference_decoding():
            ref = decode_stepwise(model, tokens, prefill=5)
        full = model(tokens)
    torch.testing.assert_close(fast, ref, **tol)
    torch.testing.assert_close(fast, full, **tol)


def test_bf16_fast_decoding_close_to_reference():
    model = build_model("(AFSF)*2", shape="tiny", seed=2, dtype=torch.bfloat16).eval()
    tokens = torch.randint(0, TINY.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = decode_stepwise(model, tokens, prefill=8).float()
        with reference_decoding():
            ref = decode_stepwise(model, tokens, prefill=8).float()
    assert (fast - ref).abs().max() < 0.05 * ref.abs().max()
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_bf16_fast_decoding_with_bias_and_qk_norm_close_to_reference():
    # The fused single-token kernel gets normed q and k (it applies RoPE itself); the fused
    # block kernel, which has no biases or norms, must stand aside.
    # (init_std 0.1: large enough that a step without the norms is far off, 14% of the max)
    shape = TINY.replace(attn_bias=True, qk_norm=True, init_std=0.1)
    model = build_model("(AF)*2", shape=shape, seed=4, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("_proj.bias", "_norm.weight")) and "mixer" in name:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
    tokens = torch.randint(0, TINY.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = decode_stepwise(model, tokens, prefill=6).float()
        with reference_decoding():
            ref = decode_stepwise(model, tokens, prefill=6).float()
        full = model(tokens).float()
    for other in (ref, full):
        assert (fast - other).abs().max() < 0.03 * other.abs().max()
        assert (fast.argmax(-1) == other.argmax(-1)).float().mean() > 0.9


def test_mamba_fast_step_updates_state_like_reference():
    torch.manual_seed(0)
    m = Mamba2(TINY.replace(ssm_groups=2)).double()
    x = torch.randn(2, 12, TINY.d_model, dtype=torch.float64)
    caches = []
    outs = []
    with torch.no_grad():
        for ref in (False, True):
            with reference_decoding(ref):
                c = m.init_cache(2, 12)
                m(x[:, :4], cache=c)
                outs.append(torch.cat([m(x[:, t : t + 1], cache=c) for t in range(4, 12)], 1))
                caches.append(c)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(caches[0].ssm_state, caches[1].ssm_state, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(caches[0].conv_state, caches[1].conv_state)
    assert caches[0].pos == caches[1].pos == 12
