"""W's banded attention against the masked reference: outputs, gradients, caches, cost."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hcomposer import build_model
from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.primitives import attention
from hcomposer.primitives.attention import (
    SlidingWindowAttention,
    band_chunk,
    banded_keys_per_query,
    banded_window_attention,
    masked_attention,
)
from hcomposer.shapes import get_shape

TINY = get_shape("tiny")


def _qkv(B, H, Hkv, T, P, hd=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, hd, generator=gen, dtype=dtype).requires_grad_()
    k = torch.randn(B, Hkv, P + T, hd, generator=gen, dtype=dtype).requires_grad_()
    v = torch.randn(B, Hkv, P + T, hd, generator=gen, dtype=dtype).requires_grad_()
    return q, k, v


def _reference(q, k, v, window):
    pos = torch.arange(k.shape[2])
    return masked_attention(q, k, v, pos[k.shape[2] - q.shape[2] :], pos, window)


# (T, P, window, chunk, H, Hkv): odd T not a multiple of the chunk, T below the window,
# chunks larger and smaller than the window, window 1, a cache prefix shorter than, equal to
# and longer than window - 1, grouped-query and plain heads.
CASES = [
    (53, 0, 13, 8, 4, 2),
    (97, 0, 16, 16, 4, 4),
    (64, 0, 16, 8, 4, 1),
    (10, 0, 16, 8, 4, 2),
    (41, 0, 5, 16, 2, 2),
    (33, 0, 1, 4, 2, 1),
    (45, 4, 13, 8, 4, 2),
    (45, 12, 13, 8, 4, 2),
    (45, 30, 13, 8, 4, 2),
]


@pytest.mark.parametrize("T, P, window, chunk, H, Hkv", CASES)
def test_band_equals_masked_reference_fp64(T, P, window, chunk, H, Hkv):
    q, k, v = _qkv(2, H, Hkv, T, P)
    y = banded_window_attention(q, k, v, window, chunk)
    y_ref = _reference(q, k, v, window)
    assert y.shape == y_ref.shape == q.shape
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    w = torch.randn_like(y)
    g = torch.autograd.grad((y * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((y_ref * w).sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_band_in_bf16_stays_near_fp64():
    q, k, v = _qkv(1, 4, 2, 70, 0, hd=16)
    want = _reference(q, k, v, 12)
    got = banded_window_attention(*(t.detach().bfloat16() for t in (q, k, v)), 12, 8)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want.detach(), atol=3e-2, rtol=3e-2)


def _layer_pair(window, seed=0):
    torch.manual_seed(seed)
    band = SlidingWindowAttention(TINY.replace(window=window)).double()
    dense = SlidingWindowAttention(TINY.replace(window=window)).double()
    dense.load_state_dict(band.state_dict())
    dense.band_chunk = 0
    return band, dense


@pytest.mark.parametrize("window, T", [(16, 77), (5, 40), (24, 11)])
def test_layer_band_equals_layer_masked(window, T):
    band, dense = _layer_pair(window)
    assert band.band_chunk == band_chunk(window)
    x = torch.randn(2, T, TINY.d_model, dtype=torch.float64, requires_grad=True)
    y, y_ref = band(x), dense(x)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    w = torch.randn_like(y)
    g = torch.autograd.grad((y * w).sum(), [x, *band.parameters()])
    g_ref = torch.autograd.grad((y_ref * w).sum(), [x, *dense.parameters()])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("prefill", [3, 16, 37, 50])
def test_layer_prefill_then_decode_equals_full(prefill):
    window, T = 16, 61
    band, _ = _layer_pair(window)
    x = torch.randn(2, T, TINY.d_model, dtype=torch.float64)
    full = band(x)
    cache = band.init_cache(2, T)
    outs = [band(x[:, :prefill], cache=cache)]
    outs += [band(x[:, t : t + 1], cache=cache) for t in range(prefill, T)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-12, rtol=1e-10)


def test_model_prefill_then_decode_equals_full_forward():
    shape = TINY.replace(window=8)
    model = build_model(Architecture.parse("W[W|A]FW", shape=shape), seed=0).double().eval()
    ids = torch.randint(0, shape.vocab_size, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.init_cache(2, ids.shape[1])
        outs = [model(ids[:, :29], cache=cache)]
        outs += [model(ids[:, t : t + 1], cache=cache) for t in range(29, ids.shape[1])]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=1e-8)


def _count_scores(monkeypatch, fn):
    """Run fn, counting the query-key scores every SDPA call computes (batch x heads x Tq x Tk)."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def counting(q, k, v, **kw):
        seen.append(q.shape[:-1].numel() * k.shape[-2])
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting)
    fn()
    return sum(seen)


@pytest.mark.parametrize("T, P", [(300, 0), (301, 7), (20, 0), (1, 15)])
def test_keys_per_query_is_what_the_band_computes(monkeypatch, T, P):
    window, chunk, H = 16, 8, 2
    q, k, v = _qkv(1, H, 1, T, P)
    scores = _count_scores(monkeypatch, lambda: banded_window_attention(q, k, v, window, chunk))
    assert scores == pytest.approx(H * T * banded_keys_per_query(T, P, window, chunk))


def test_accounting_charges_the_band_and_the_band_path_computes_near_it():
    # The accounting's attention FLOPs are the band's scores (the mask's True entries); the
    # chunked path computes (chunk + window - 1) / window of them, padding aside.
    shape = get_shape("10m").replace(window=512)
    T = 8192
    prim = SlidingWindowAttention(shape)
    pos = torch.arange(T)
    band = ((pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - 512)).sum().item()
    per_score = 4 * prim.n_heads * prim.head_dim
    assert prim.extra_flops_per_token(T) == pytest.approx(per_score * band / T, rel=1e-12)
    costs = count_costs(Architecture.parse("W", shape=shape), seq_len=T)
    a_costs = count_costs(Architecture.parse("A", shape=shape), seq_len=T)
    assert a_costs.flops_per_token - costs.flops_per_token == pytest.approx(
        per_score * ((T + 1) / 2 - band / T), rel=1e-12
    )
    computed = banded_keys_per_query(T, 0, 512, prim.band_chunk)
    assert 1.0 < computed / (band / T) <= (prim.band_chunk + 511) / 512 * 1.02
