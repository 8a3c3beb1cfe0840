"""W's banded attention against the masked reference: outputs, gradients, caches, cost."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hcomposer import build_model
from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.primitives import window_band
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
# T equal to the window and T a multiple of chunk and window, chunks larger and smaller than
# the window, window 1 and 2, a cache prefix shorter than, equal to
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
    (64, 0, 64, 16, 4, 2),
    (40, 0, 64, 16, 2, 1),
    (48, 0, 16, 16, 4, 2),
    (50, 3, 2, 16, 2, 2),
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


def test_band_gradients_in_bf16_stay_near_fp64():
    q, k, v = _qkv(2, 4, 2, 70, 3, hd=16)
    want = _reference(q, k, v, 12)
    g = torch.randn_like(want)
    g_ref = torch.autograd.grad((want * g).sum(), (q, k, v))
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    got = banded_window_attention(*low, 12, 8)
    grads = torch.autograd.grad((got * g.bfloat16()).sum(), low)
    for a, b in zip(grads, g_ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, atol=8e-2, rtol=5e-2)


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
    assert band.band_chunk == band_chunk(window, band.n_heads // band.n_kv_heads)
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
    """Run fn, counting the query-key scores every attention kernel call computes (batch x
    heads x Tq x Tk): SDPA's and the CPU flash kernel's the banded path calls directly."""
    seen = []
    sdpa, flash = F.scaled_dot_product_attention, window_band._CPU_FORWARD

    def counting(kernel):
        def call(q, k, v, *args, **kw):
            seen.append(q.shape[:-1].numel() * k.shape[-2])
            return kernel(q, k, v, *args, **kw)

        return call

    monkeypatch.setattr(window_band.F, "scaled_dot_product_attention", counting(sdpa))
    monkeypatch.setattr(window_band, "_CPU_FORWARD", counting(flash))
    fn()
    return sum(seen)


@pytest.mark.parametrize("T, P", [(300, 0), (301, 7), (20, 0), (1, 15), (12, 0), (40, 30)])
def test_keys_per_query_is_what_the_band_computes(monkeypatch, T, P):
    window, chunk, H = 16, 8, 2
    q, k, v = _qkv(1, H, 1, T, P)
    scores = _count_scores(monkeypatch, lambda: banded_window_attention(q, k, v, window, chunk))
    assert scores == pytest.approx(H * T * banded_keys_per_query(T, P, window, chunk))


def _backward_steps(t) -> set[str]:
    """Names of every step in t's autograd graph."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and type(fn).__name__ not in seen:
            seen.add(type(fn).__name__)
            todo += [nxt for nxt, _ in fn.next_functions]
    return seen


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("T, P, chunk", [(700, 0, 20), (430, 300, 32)])
def test_band_with_key_blocks_rounded_up_equals_masked_fp64(monkeypatch, T, P, chunk, kernels):
    # From 512 keys a chunk up, its key block is padded to a multiple of 64 (519 -> 576 and
    # 531 -> 576 here): outputs, gradients and the scores counted against the reference, on
    # the CPU kernels' path and on the SDPA path.
    window = 500
    if not kernels:
        monkeypatch.setattr(window_band, "_cpu_kernels", lambda q: False)
    q, k, v = _qkv(1, 4, 2, T, P)
    y = banded_window_attention(q, k, v, window, chunk)
    y_ref = _reference(q, k, v, window)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    w = torch.randn_like(y)
    g = torch.autograd.grad((y * w).sum(), (q, k, v))
    for a, b in zip(g, torch.autograd.grad((y_ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    n = -(-T // chunk)
    with torch.no_grad():
        scores = _count_scores(monkeypatch, lambda: banded_window_attention(q, k, v, window, chunk))
    assert scores == 4 * n * chunk * 576 == 4 * T * banded_keys_per_query(T, P, window, chunk)


@pytest.mark.parametrize("H, Hkv", [(4, 2), (6, 2), (3, 3)])
def test_cpu_kernel_path_equals_sdpa_path(monkeypatch, H, Hkv):
    # The CPU path (flash kernels, own backward, grouped query heads folded into one call)
    # against the same chunks through SDPA and autograd, which the band takes elsewhere and
    # under torch.compile: outputs and gradients.
    T, P, window, chunk = 83, 5, 13, 8
    q, k, v = _qkv(2, H, Hkv, T, P, dtype=torch.float32)
    y = banded_window_attention(q, k, v, window, chunk)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), (q, k, v))
    monkeypatch.setattr(window_band, "_cpu_kernels", lambda q: False)
    y_sdpa = banded_window_attention(q, k, v, window, chunk)
    assert "_CpuBandBackward" in _backward_steps(y)
    assert "_CpuBandBackward" not in _backward_steps(y_sdpa)
    torch.testing.assert_close(y, y_sdpa, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, torch.autograd.grad((y_sdpa * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_band_chunk_folds_groups_onto_the_kernels_larger_blocks():
    # Ungrouped heads: chunks of 192 at most; grouped: group * chunk rows of 256 (64 at least).
    assert [band_chunk(512, g) for g in (1, 2, 4, 8)] == [192, 128, 64, 64]
    assert band_chunk(40, 2) == 20 and band_chunk(20, 1) == 16


def test_accounting_charges_the_band_and_the_band_path_computes_near_it():
    # The accounting's attention FLOPs are the band's scores (the mask's True entries); the
    # chunked path computes chunk + window - 1 scores per query, padding aside.
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
    # chunk + window - 1 keys per query rounded up to 64, plus the last chunk's padding
    assert band / T < computed <= (prim.band_chunk + 511 + 63) * 1.01
