"""The fused bf16 CPU decode kernels (hcomposer/primitives/csrc/decode_cpu.c) against PyTorch.

Each kernel is compared with an fp64 computation from the same bf16 inputs (the kernels keep
fp32 and round once, so they sit within one bf16 rounding of it) and with the PyTorch path it
replaces; whole models decode with the kernels as they do without them and as the full forward
computes. A machine without a C compiler skips the comparisons; the fallback is tested in a
subprocess with the kernels turned off and with a compiler that does not exist.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hcomposer.model import build_model
from hcomposer.primitives import cpu_kernels as ck
from hcomposer.primitives.attention import apply_rope, rope_angles, rope_inv_freq
from hcomposer.primitives.base import Linear, RMSNorm
from hcomposer.primitives.decoding import reference_decoding
from hcomposer.primitives.mamba2 import Mamba2
from hcomposer.shapes import get_shape

HAVE_CC = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
KERNELS_OFF = os.environ.get("HCOMPOSER_CPU_KERNELS", "1").lower() in ("0", "false", "off", "no")
needs_kernels = pytest.mark.skipif(
    not HAVE_CC or KERNELS_OFF, reason="no C compiler (or HCOMPOSER_CPU_KERNELS=0)"
)
EPS = 2.0**-8  # bf16's relative rounding step


def _bf16(*shape, scale=1.0, g=None):
    return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)


def _close_bf16(got: torch.Tensor, want: torch.Tensor, ulps: float = 1.0):
    """got (bf16) within `ulps` bf16 roundings of want (fp64), relative to want's scale."""
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    err = (got.double() - want).abs().max().item()
    tol = ulps * EPS * max(want.abs().max().item(), 1e-6)
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


@needs_kernels
def test_the_kernels_build_on_this_machine():
    assert ck.available(), ck.status()
    assert ck.status().startswith("on (")


@needs_kernels
@pytest.mark.parametrize(
    "M,N,K,bias",
    [(1, 768, 256, False), (1, 37, 29, True), (3, 50, 64, True), (8, 33, 200, False)],
)
def test_linear_equals_fp64_and_torch(M, N, K, bias):
    g = torch.Generator().manual_seed(M * 1000 + N)
    x, w = _bf16(M, 1, K, g=g), _bf16(N, K, scale=0.1, g=g)
    b = _bf16(N, g=g) if bias else None
    with torch.no_grad():
        y = ck.linear(x, w, b)
        ref = x.double() @ w.double().T + (0 if b is None else b.double())
        assert y is not None and y.shape == (M, 1, N)
        _close_bf16(y, ref, ulps=1.0)
        _close_bf16(F.linear(x, w, b), ref, ulps=1.0)  # the path it replaces, same bound


@needs_kernels
def test_linear_threads_give_identical_results():
    x, w = _bf16(2, 256), _bf16(4096, 256)
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = ck.linear(x, w)
            torch.set_num_threads(2)
            two = ck.linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_kernels
def test_kernels_step_aside_where_they_do_not_apply():
    x, w = _bf16(1, 64), _bf16(32, 64)
    wg = w.clone().requires_grad_(True)
    with torch.no_grad():
        assert ck.linear(x, w) is not None
        assert ck.linear(_bf16(ck.MAX_ROWS + 1, 64), w) is None  # prefill-sized input
        assert ck.linear(x.float(), w.float()) is None  # not bf16
        assert ck.linear(x, w.t().contiguous().t()) is None  # strided rows
        with reference_decoding():
            assert ck.linear(x, w) is None
        with ck.kernels_disabled():
            assert ck.linear(x, w) is None and not ck.enabled()
        assert ck.enabled()
    assert ck.linear(x, wg) is None  # autograd wants this product: PyTorch computes it


@needs_kernels
def test_linear_module_trains_through_pytorch():
    torch.manual_seed(0)
    lin = Linear(16, 8).to(torch.bfloat16)
    x = _bf16(1, 16).requires_grad_(True)
    y = lin(x)
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))  # bitwise: PyTorch's path
    y.float().sum().backward()
    assert lin.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        _close_bf16(lin(x), x.double() @ lin.weight.double().T + lin.bias.double())


@needs_kernels
def test_swiglu_equals_pytorch():
    g = torch.Generator().manual_seed(1)
    x, wg, wu = _bf16(2, 1, 96, g=g), _bf16(200, 96, scale=0.2, g=g), _bf16(200, 96, g=g)
    with torch.no_grad():
        y = ck.swiglu(x, wg, wu)
        want = F.silu(F.linear(x, wg)) * F.linear(x, wu)
        gate, up = x.double() @ wg.double().T, x.double() @ wu.double().T
        _close_bf16(y, F.silu(gate) * up, ulps=3.0)  # three roundings, as PyTorch's
    # PyTorch rounds at the same points, so most elements agree exactly.
    assert (y == want).float().mean().item() > 0.9


@needs_kernels
def test_rmsnorm_equals_the_module():
    norm = RMSNorm(48, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(_bf16(48))
        x = _bf16(3, 1, 48, scale=3.0)
        got = norm(x)
        with ck.kernels_disabled():
            want = norm(x)
        x64 = x.double()
        ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
        _close_bf16(got, ref, ulps=1.0)
        assert (got == want).float().mean().item() > 0.9


def _attention_fp64(q, k, v):
    g = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = q.double() @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(s, -1) @ vv


@needs_kernels
@pytest.mark.parametrize(
    "B,H,Hkv,hd,L",
    [
        (1, 4, 2, 64, 3000),  # the 10m shape's heads
        (2, 6, 3, 40, 301),  # head dim with no vector path
        (1, 8, 1, 128, 77),  # eight query heads per kv head
        (2, 4, 4, 32, 1),  # one position
        (1, 2, 1, 256, 520),  # the widest head the kernel takes
        (1, 3, 3, 8, 9),
        (1, 4, 2, 96, 700),  # head dims outside the unrolled set take the generic vector loop
        (1, 2, 1, 48, 33),
    ],
)
def test_attn_decode_equals_fp64(B, H, Hkv, hd, L):
    g = torch.Generator().manual_seed(L)
    store_k, store_v = _bf16(B, Hkv, L + 5, hd, g=g), _bf16(B, Hkv, L + 5, hd, g=g)
    k, v = store_k[:, :, :L], store_v[:, :, :L]  # a cache's [:, :, :pos] view
    q = _bf16(B, H, 1, hd, scale=2.0, g=g)
    with torch.no_grad():
        out = ck.attn_decode(q, k, v)
    assert out is not None
    # Scores in fp32 then one rounding of the output: far inside the bf16 reference's error.
    _close_bf16(out, _attention_fp64(q, k, v), ulps=1.0)


@needs_kernels
def test_attn_decode_threads_give_identical_results():
    q, k, v = _bf16(2, 4, 1, 64), _bf16(2, 2, 999, 64), _bf16(2, 2, 999, 64)
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = ck.attn_decode(q, k, v)
            torch.set_num_threads(2)
            two = ck.attn_decode(q, k, v)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_kernels
def test_attn_step_rotates_writes_the_cache_and_attends():
    B, H, Hkv, hd, pos, max_len = 2, 4, 2, 64, 37, 50
    g = torch.Generator().manual_seed(3)
    kc, vc = _bf16(B, Hkv, max_len, hd, g=g), _bf16(B, Hkv, max_len, hd, g=g)
    kc0, vc0 = kc.clone(), vc.clone()
    q, k, v = _bf16(B, H, 1, hd, g=g), _bf16(B, Hkv, 1, hd, g=g), _bf16(B, Hkv, 1, hd, g=g)
    inv = rope_inv_freq(hd, 10000.0)
    with torch.no_grad():
        out = ck.attn_step(q, k, v, kc, vc, pos, inv)
    assert out is not None
    cos, sin = rope_angles(torch.tensor([pos]), hd, 10000.0, inv)
    k_rot, q_rot = apply_rope(k, cos, sin), apply_rope(q, cos, sin)
    # The new key is PyTorch's rotated key (to within one rounding), the value copied as is.
    torch.testing.assert_close(kc[:, :, pos : pos + 1], k_rot, atol=0.0, rtol=EPS)
    assert torch.equal(vc[:, :, pos : pos + 1], v)
    # Nothing else in the caches moved.
    mask = torch.ones(max_len, dtype=torch.bool)
    mask[pos] = False
    assert torch.equal(kc[:, :, mask], kc0[:, :, mask]) and torch.equal(
        vc[:, :, mask], vc0[:, :, mask]
    )
    want = _attention_fp64(q_rot, kc[:, :, : pos + 1], vc[:, :, : pos + 1])
    _close_bf16(out, want, ulps=2.0)
    with torch.no_grad():  # a full cache is refused before anything is written
        assert ck.attn_step(q, k, v, kc, vc, max_len, inv) is None


@needs_kernels
def test_ssm_step_equals_the_pytorch_step():
    torch.manual_seed(0)
    shape = get_shape("tiny")
    m = Mamba2(shape).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in (m.dt_bias, m.D, m.norm.weight, m.conv1d.bias):
            p.add_(0.3 * torch.randn_like(p.float()).to(p.dtype))
    caches = [m.init_cache(2, 16) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    conv = _bf16(*caches[0].conv_state.shape, g=g)
    state = 0.3 * torch.randn(caches[0].ssm_state.shape, generator=g)
    for c in caches:
        c.conv_state.copy_(conv)
        c.ssm_state.copy_(state)
    outs = []
    with torch.no_grad():
        for i, c in enumerate(caches):
            g.manual_seed(7)  # the same three inputs for both
            with ck.kernels_disabled(i == 1):
                outs.append(torch.cat([m(_bf16(2, 1, shape.d_model, g=g), cache=c)
                                       for _ in range(3)], 1))  # fmt: skip
    kernel, torch_path = outs
    # The conv state holds bf16 projections: the kernel GEMV and PyTorch's may round an
    # element differently by one step, so compare within bf16 rounding, not bit for bit.
    torch.testing.assert_close(caches[0].conv_state, caches[1].conv_state, atol=0.0, rtol=EPS)
    torch.testing.assert_close(caches[0].ssm_state, caches[1].ssm_state, rtol=1e-4, atol=1e-5)
    scale = torch_path.abs().max().item()
    assert (kernel.float() - torch_path.float()).abs().max().item() <= 4 * EPS * scale
    assert caches[0].pos == caches[1].pos == 3


@needs_kernels
@pytest.mark.parametrize("pattern", ["(AF)*2", "AFSFSF", "F[A|S]F", "SWAF", "DFAF"])
def test_models_decode_with_kernels_as_without(pattern):
    """Cached bf16 decoding with the kernels equals the full forward as closely as the
    PyTorch decode paths do, and the kernels are the ones running (standard cache layout)."""
    torch.manual_seed(0)
    m = build_model(pattern, shape="tiny", seed=0, dtype=torch.bfloat16).eval()
    toks = torch.randint(0, m.arch.shape.vocab_size, (2, 20))
    with torch.no_grad():
        full = m(toks).double()[:, 12:]
        got = {}
        for off in (False, True):
            with ck.kernels_disabled(off):
                cache = m.init_cache(2, 24)
                m(toks[:, :12], cache=cache)
                steps = [m(toks[:, i : i + 1], cache=cache) for i in range(12, 20)]
                got[off] = torch.cat(steps, 1).double()
                kv = [c for c in cache.layers if hasattr(c, "k") and c.k.shape[2] == 24]
                for c in kv:  # the kernels read head_dim-contiguous caches; PyTorch the other
                    assert (c.k.stride(3) == 1) != off
    scale = full.abs().max().item()
    err_kernel = (got[False] - full).abs().max().item()
    err_torch = (got[True] - full).abs().max().item()
    assert err_kernel <= max(2 * err_torch, 4 * EPS * scale), (err_kernel, err_torch)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)  # fmt: skip


_FALLBACK = """
import torch
from hcomposer.primitives import cpu_kernels as ck
from hcomposer.model import build_model
print(ck.status())
x, w = torch.randn(1, 8).bfloat16(), torch.randn(4, 8).bfloat16()
with torch.no_grad():
    assert ck.linear(x, w) is None and not ck.available()
    m = build_model("AFSF", shape="tiny", seed=0, dtype=torch.bfloat16).eval()
    toks = torch.randint(0, 100, (1, 6))
    cache = m.init_cache(1, 8)
    m(toks[:, :5], cache=cache)
    step = m(toks[:, 5:], cache=cache).double()
    full = m(toks).double()[:, 5:]
    assert (step - full).abs().max().item() <= 0.05 * full.abs().max().item()
print("decoded")
"""


def test_without_kernels_decoding_falls_back_to_pytorch(tmp_path):
    off = _run(_FALLBACK, HCOMPOSER_CPU_KERNELS="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.splitlines()[0] == "off (HCOMPOSER_CPU_KERNELS=0)"
    assert "decoded" in off.stdout
    broken = _run(_FALLBACK, CC=str(tmp_path / "no-such-cc"), HCOMPOSER_KERNEL_CACHE=str(tmp_path))
    assert broken.returncode == 0, broken.stderr
    assert broken.stdout.splitlines()[0].startswith("off (the build failed")
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


@needs_kernels
def test_the_build_goes_to_the_cache_folder_once(tmp_path):
    code = "from hcomposer.primitives import cpu_kernels as ck; print(ck.status())"
    first = _run(code, HCOMPOSER_KERNEL_CACHE=str(tmp_path))
    assert first.returncode == 0 and first.stdout.startswith("on ("), first.stdout + first.stderr
    built = sorted(p.name for p in tmp_path.iterdir())
    assert len(built) == 1 and built[0].endswith(".so")
    mtime = (tmp_path / built[0]).stat().st_mtime_ns
    second = _run(code, HCOMPOSER_KERNEL_CACHE=str(tmp_path))
    assert second.stdout == first.stdout
    assert (tmp_path / built[0]).stat().st_mtime_ns == mtime  # loaded, not rebuilt


@needs_kernels
@pytest.mark.parametrize("pattern", ["AFS", "(AF)*2"])
def test_decode_blocks_equal_the_per_operation_kernels(pattern, monkeypatch):
    """A whole block in one call (norm, projections, step, residual) rounds where the chain
    of per-operation kernels does, so the two give identical logits and caches."""
    torch.manual_seed(0)
    m = build_model(pattern, shape="tiny", seed=0, dtype=torch.bfloat16).eval()
    toks = torch.randint(0, m.arch.shape.vocab_size, (2, 10))
    runs, fused_calls = [], []
    for blk in m.layers:  # count the steps the fused blocks took

        def counted(*a, _f=blk.mixer.decode_block, **k):
            y = _f(*a, **k)
            fused_calls.append(y is not None)
            return y

        monkeypatch.setattr(blk.mixer, "decode_block", counted)
    for fused in (True, False):
        if not fused:  # every primitive declines the fused block: the modules run
            for blk in m.layers:
                monkeypatch.setattr(blk.mixer, "decode_block", lambda *a, **k: None)
        with torch.no_grad():
            cache = m.init_cache(2, 12)
            m(toks[:, :6], cache=cache)
            logits = torch.cat([m(toks[:, i : i + 1], cache=cache) for i in range(6, 10)], 1)
        runs.append((logits, cache))
    (a, ca), (b, cb) = runs
    assert fused_calls and all(fused_calls)  # 4 steps x every layer, all fused
    assert len(fused_calls) == 4 * len(m.layers)
    assert torch.equal(a, b)
    for la, lb in zip(ca.layers, cb.layers):
        for name in ("k", "v", "conv_state", "ssm_state"):
            if hasattr(la, name):
                assert torch.equal(getattr(la, name), getattr(lb, name)), name
    assert ca.pos == cb.pos == 10


def _peaky_attention_model(dtype=torch.bfloat16):
    """`AF` with head dim 64 (the vector path) and sharp attention: queries and keys scaled
    up so that RoPE positions and every score matter to the output."""
    import dataclasses

    shape = dataclasses.replace(get_shape("tiny"), name="tiny-hd64", d_model=128, n_heads=2,
                                n_kv_heads=1, ffn_dim=256)  # fmt: skip
    torch.manual_seed(0)
    m = build_model("AF", shape=shape, seed=0, dtype=dtype).eval()
    with torch.no_grad():
        attn = m.layers[0].mixer
        attn.q_proj.weight.mul_(8)
        attn.k_proj.weight.mul_(8)
    return m


@needs_kernels
def test_sharp_attention_decodes_like_the_full_forward():
    """With attention far from uniform (so a wrong rotation, position or key would show), the
    fused block at head dim 64 follows the full forward element by element."""
    m = _peaky_attention_model()
    toks = torch.randint(
        0, m.arch.shape.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        full = m(toks).double()[:, 40:]
        cache = m.init_cache(2, 48)
        m(toks[:, :40], cache=cache)
        assert cache.layers[0].k.stride(3) == 1  # the layout the kernels read
        got = torch.cat([m(toks[:, i : i + 1], cache=cache) for i in range(40, 48)], 1).double()
        p = torch.softmax(full.float(), -1)
        assert p.max().item() > 0.02  # not a uniform guess over 256 tokens
    err = (got - full).abs()
    assert err.max().item() <= 2.0**-5 * full.abs().max().item(), err.max().item()
    assert err.mean().item() <= 2.0**-8 * full.abs().mean().item() * 4


@needs_kernels
def test_a_nan_reaches_the_attention_output():
    q, k, v = _bf16(1, 4, 1, 64), _bf16(1, 2, 16, 64), _bf16(1, 2, 16, 64)
    q[0, 1, 0, 5] = float("nan")
    with torch.no_grad():
        out = ck.attn_decode(q, k, v)
    assert torch.isnan(out[0, 1]).all()  # the head with the NaN query
    assert not torch.isnan(out[0, 0]).any() and not torch.isnan(out[0, 2:]).any()
    k[0, 1, 3, 0] = float("nan")  # a NaN key poisons its KV head's group (heads 2 and 3)
    q[0, 1, 0, 5] = 0.5
    with torch.no_grad():
        out = ck.attn_decode(q, k, v)
    assert torch.isnan(out[0, 2:]).all() and not torch.isnan(out[0, :2]).any()


@needs_kernels
def test_shapes_the_kernels_do_not_take_are_refused_before_anything_is_written():
    B, H, Hkv, hd = 1, 4, 2, 64
    kc, vc = _bf16(B, Hkv, 10, hd), _bf16(B, Hkv, 10, hd)
    kc0, vc0 = kc.clone(), vc.clone()
    inv = rope_inv_freq(hd, 10000.0)
    q2, k, v = _bf16(2, H, 1, hd), _bf16(B, Hkv, 1, hd), _bf16(B, Hkv, 1, hd)
    with torch.no_grad():
        assert ck.attn_step(q2, k, v, kc, vc, 3, inv) is None  # q's batch is not the cache's
        assert ck.attn_step(q2[:1], k, v, kc, vc, -1, inv) is None  # a negative position
        assert ck.attn_step(q2[:1], k, v, kc, vc, 10, inv) is None  # the cache is full
        assert ck.attn_step(q2[:1], _bf16(B, Hkv, 1, 32), v, kc, vc, 3, inv) is None
        assert ck.attn_decode(q2, kc, vc) is None
        assert torch.equal(kc, kc0) and torch.equal(vc, vc0)
        x, w = _bf16(1, 8), _bf16(4, 8)
        assert ck.linear(x, w, _bf16(1)) is None  # a broadcast bias: PyTorch's job
        # A Mamba-2 cache for another batch size, or from another shape, is left alone.
        m = Mamba2(get_shape("tiny")).to(torch.bfloat16).eval()
        cache = m.init_cache(1, 8)
        before = cache.ssm_state.clone(), cache.conv_state.clone()
        z = _bf16(2, m.in_proj.out_features)
        assert ck.ssm_step(m, z, cache) is None
        assert ck.block_ssm(_bf16(2, 1, 64), RMSNorm(64).to(torch.bfloat16), m, cache) is None
        assert torch.equal(cache.ssm_state, before[0]) and torch.equal(cache.conv_state, before[1])
        assert cache.pos == 0


_UNWRITABLE = """
import torch
from hcomposer.primitives import cpu_kernels as ck
from hcomposer.primitives.base import Linear
lin = Linear(8, 4).to(torch.bfloat16)
with torch.no_grad():
    y = lin(torch.randn(1, 8).bfloat16())
print(ck.status())
print(tuple(y.shape))
"""


def test_an_unwritable_kernel_cache_falls_back():
    r = _run(_UNWRITABLE, HCOMPOSER_KERNEL_CACHE="/dev/null/kernels")
    assert r.returncode == 0, r.stderr
    status, shape = r.stdout.splitlines()
    assert status.startswith("off (the build failed") and shape == "(1, 4)"
