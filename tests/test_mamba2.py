"""The S primitive: cached decoding and prefill equal the full forward, bf16, costs, init."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import f64_input, run_pieces
from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.errors import ShapeError
from hcomposer.model import build_model
from hcomposer.primitives import mamba2 as mamba2_mod
from hcomposer.primitives.mamba2 import A_INIT_RANGE, DT_RANGE, Mamba2, Mamba2Cache
from hcomposer.shapes import get_shape

F64 = torch.float64
TINY = get_shape("tiny")  # 8 SSM heads of 16, state 16, conv 4, chunk 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(shape=TINY, seed=0, **kw) -> Mamba2:
    torch.manual_seed(seed)
    return Mamba2(shape, **kw).double()


def test_step_by_step_decoding_equals_full_forward():
    m = _layer()
    x = f64_input(2, 37, TINY.d_model)  # 37: not a multiple of the chunk
    torch.testing.assert_close(run_pieces(m, x, [1] * 37), m(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sizes", [[20, 1, 1, 1, 1], [5, 17, 1, 2, 13], [16, 16, 6], [3, 35]])
def test_prefill_then_decode_and_chunked_prefill_equal_full_forward(sizes):
    m = _layer(shape=TINY.replace(ssm_groups=2), seed=3)
    x = f64_input(2, sum(sizes), TINY.d_model, seed=2)
    torch.testing.assert_close(run_pieces(m, x, sizes), m(x), rtol=1e-10, atol=1e-10)


def test_short_conv_kernels_decode_correctly():
    for k in (1, 2):
        m = _layer(shape=TINY.replace(ssm_conv=k))
        x = f64_input(1, 9, TINY.d_model)
        torch.testing.assert_close(run_pieces(m, x, [4, 1, 1, 3]), m(x))


def test_group_branch_decoding_equals_full_forward():
    model = build_model("A[A|S]F", shape="tiny", seed=0, dtype=F64)
    branch = model.layers[1].mixer.branches[1]
    assert isinstance(branch, Mamba2) and not branch.project and not hasattr(branch, "out_proj")
    assert branch.n_heads == TINY.ssm_heads // 2 and branch.inner_dim == branch.n_heads * 16
    tokens = torch.randint(0, TINY.vocab_size, (2, 29), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    cache = model.init_cache(2, 29)
    steps = [model(tokens[:, :9], cache=cache)]
    steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(9, 29)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-9)


def test_s_model_generate_matches_greedy_full_forward():
    model = build_model("SFSF", shape="tiny", seed=1)
    prompt = torch.randint(0, TINY.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, 8)
    seq = prompt
    for _ in range(8):
        seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_bf16_autocast_runs_and_is_close_to_fp32():
    torch.manual_seed(0)
    m = Mamba2(TINY)
    x = torch.randn(2, 40, TINY.d_model)
    y32 = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = m(x)
        y16.float().pow(2).mean().backward()
    assert y16.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.A_log.grad is not None and m.dt_bias.grad is not None
    rel = (y16.float() - y32).norm() / y32.norm()
    assert rel < 3e-2, rel


def test_bf16_weights_cached_decoding_close_to_full():
    model = build_model("SF", shape="tiny", seed=2, dtype=torch.bfloat16)
    tokens = torch.randint(0, TINY.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    full = model(tokens).float()
    cache = model.init_cache(1, 20)
    assert cache.layers[0].ssm_state.dtype == torch.float32
    assert cache.layers[0].conv_state.dtype == torch.bfloat16
    steps = torch.cat([model(tokens[:, i : i + 1], cache=cache) for i in range(20)], 1).float()
    assert ((steps - full).norm() / full.norm()) < 3e-2


@pytest.mark.parametrize("dtype,nbytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_state_bytes_equal_cache_tensors(dtype, nbytes):
    m = Mamba2(TINY.replace(ssm_groups=2)).to(dtype)
    cache = m.init_cache(3, 100)
    assert isinstance(cache, Mamba2Cache)
    assert cache.conv_state.shape == (3, m.conv_dim, TINY.ssm_conv - 1)
    assert cache.ssm_state.shape == (3, m.n_heads, m.head_dim, m.d_state)
    real = cache.conv_state.nbytes + cache.ssm_state.nbytes
    assert m.state_bytes(nbytes) * 3 == real
    assert m.kv_bytes_per_token(nbytes) == 0
    # The accounting (meta device, 2-byte dtype) sees the same bytes as a built bf16 model.
    arch = Architecture.parse("S[A|S]F", shape="tiny")
    model = build_model(arch, dtype=torch.bfloat16)
    mc = model.init_cache(1, 50)
    s_caches = [mc.layers[0], mc.layers[1][1]]
    built = sum(c.conv_state.nbytes + c.ssm_state.nbytes for c in s_caches)
    assert count_costs(arch).state_bytes == built


def _closed_form_params(shape, heads, project=True):
    d, P, N, G, K = (
        shape.d_model,
        shape.ssm_head_dim,
        shape.ssm_state,
        shape.ssm_groups,
        shape.ssm_conv,
    )
    inner = heads * P
    conv_ch = inner + 2 * G * N
    in_proj = d * (2 * inner + 2 * G * N + heads)
    conv = conv_ch * K + conv_ch
    per_head = 3 * heads  # dt_bias, A_log, D
    norm = inner
    out_proj = inner * d if project else 0
    return in_proj + conv + per_head + norm + out_proj


@pytest.mark.parametrize("preset", ["tiny", "proxy", "llama-3.2-1b"])
def test_parameter_count_matches_closed_form(preset):
    shape = get_shape(preset)
    with torch.device("meta"):
        m = Mamba2(shape)
        half = Mamba2(shape, fraction=0.5, project=False)
    count = sum(p.numel() for p in m.parameters())
    assert count == _closed_form_params(shape, shape.ssm_heads)
    assert sum(p.numel() for p in half.parameters()) == _closed_form_params(
        shape, shape.ssm_heads // 2, project=False
    )
    if preset == "llama-3.2-1b":
        # d 2048, expand 2, head dim 128 (32 heads), state 128, conv 4, one group.
        assert count == 2048 * (8192 + 256 + 32) + 4352 * 5 + 96 + 4096 + 4096 * 2048


def test_special_init():
    torch.manual_seed(0)
    m = Mamba2(TINY.replace(ssm_head_dim=4))  # 32 heads: enough draws to see the ranges
    a = torch.exp(m.A_log.detach())
    assert A_INIT_RANGE[0] <= a.min() and a.max() <= A_INIT_RANGE[1]
    dt = F.softplus(m.dt_bias.detach())
    assert DT_RANGE[0] * 0.999 <= dt.min() and dt.max() <= DT_RANGE[1] * 1.001
    assert torch.equal(m.D.detach(), torch.ones_like(m.D))
    # build_model's normal init must not overwrite them (it re-applies the special init).
    model = build_model("SF", shape="tiny", seed=0)
    a = torch.exp(model.layers[0].mixer.A_log.detach())
    assert A_INIT_RANGE[0] <= a.min() and a.max() <= A_INIT_RANGE[1]


def test_fraction_that_does_not_split_heads_is_a_shape_error():
    with pytest.raises(ShapeError, match="ssm_heads"):
        Mamba2(TINY, fraction=1 / 3)
    with pytest.raises(ShapeError, match="ssm_groups"):
        Mamba2(TINY.replace(ssm_groups=8), fraction=0.5)


def test_fast_path_never_used_on_cpu_and_announced_once(monkeypatch, caplog):
    def kernel(*args, **kwargs):
        raise AssertionError("the CUDA kernel was called on CPU input")

    usable = dataclasses.replace(mamba2_mod._KERNEL, fn=kernel, looked=True, announced=False)
    monkeypatch.setattr(mamba2_mod, "_KERNEL", usable)
    with caplog.at_level(logging.INFO, logger=mamba2_mod.__name__):
        m = Mamba2(TINY)
        Mamba2(TINY)
    msgs = [r.getMessage() for r in caplog.records if r.name == mamba2_mod.__name__]
    assert len(msgs) == 1 and "mamba_chunk_scan_combined" in msgs[0]
    m(torch.randn(1, 20, TINY.d_model))  # CPU: the PyTorch scan, never the kernel


def _plain_mamba2(m: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """The module's math written out independently: loops for the conv, the reference scan."""
    from hcomposer.primitives.ssd import ssd_reference

    b, t, _ = u.shape
    inner, cd, H = m.inner_dim, m.conv_dim, m.n_heads
    proj = u @ m.in_proj.weight.T
    z, xbc, dt = proj[..., :inner], proj[..., inner : inner + cd], proj[..., inner + cd :]
    w, bias = m.conv1d.weight[:, 0], m.conv1d.bias  # [C, K]
    K = w.shape[1]
    conv = torch.stack(
        [
            bias + sum(w[:, K - 1 - j] * xbc[:, i - j] for j in range(K) if i - j >= 0)
            for i in range(t)
        ],
        dim=1,
    )
    conv = conv * torch.sigmoid(conv)
    G, N, P = m.n_groups, m.d_state, m.head_dim
    x = conv[..., :inner].reshape(b, t, H, P)
    B = conv[..., inner : inner + G * N].reshape(b, t, G, N)
    C = conv[..., inner + G * N :].reshape(b, t, G, N)
    dt = torch.log1p(torch.exp(dt + m.dt_bias))
    A = -torch.exp(m.A_log)
    y, _ = ssd_reference(x, dt, A, B, C)
    y = (y + x * m.D[:, None]).reshape(b, t, inner) * (z * torch.sigmoid(z))
    yg = y.reshape(b, t, G, inner // G)
    yg = yg / torch.sqrt(yg.pow(2).mean(-1, keepdim=True) + m.norm.eps)
    y = yg.reshape(b, t, inner) * m.norm.weight
    return y @ m.out_proj.weight.T


@pytest.mark.parametrize("groups", [1, 2])
def test_forward_matches_a_plain_reimplementation(groups):
    m = _layer(shape=TINY.replace(ssm_groups=groups), seed=5)
    with torch.no_grad():  # move every parameter off its special value so each one matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    u = f64_input(2, 21, TINY.d_model, seed=6)
    torch.testing.assert_close(m(u), _plain_mamba2(m, u), rtol=1e-10, atol=1e-10)


def test_matches_transformers_mamba2_mixer_with_same_weights():
    # An independent implementation of the same layer: transformers' Mamba2Mixer (PyTorch path).
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    shape = TINY.replace(ssm_groups=2)
    torch.manual_seed(0)
    ours = Mamba2(shape)
    cfg = transformers.Mamba2Config(
        hidden_size=shape.d_model, num_heads=ours.n_heads, head_dim=ours.head_dim,
        state_size=ours.d_state, expand=shape.ssm_expand, n_groups=ours.n_groups,
        conv_kernel=ours.d_conv, chunk_size=shape.ssm_chunk, layer_norm_epsilon=shape.norm_eps,
        use_bias=False, use_conv_bias=True, num_hidden_layers=1,
    )  # fmt: skip
    hf = Mamba2Mixer(cfg, layer_idx=0)
    with torch.no_grad():
        for name in ("in_proj", "conv1d", "out_proj"):
            getattr(hf, name).load_state_dict(getattr(ours, name).state_dict())
        for name in ("dt_bias", "A_log", "D"):
            getattr(hf, name).copy_(getattr(ours, name))
        hf.norm.weight.copy_(ours.norm.weight + 0.1 * torch.randn_like(ours.norm.weight))
        ours.norm.weight.copy_(hf.norm.weight)
    u = torch.randn(2, 45, shape.d_model)
    torch.testing.assert_close(ours(u), hf(u), rtol=1e-4, atol=1e-5)
