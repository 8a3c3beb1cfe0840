"""The fused CUDA kernels against our PyTorch scans, and our D against fla's own reference.

- CPU, when flash-linear-attention is installed (``dev`` extra): our chunked and step-loop gated
  delta rule against fla's pure-PyTorch ``naive_recurrent_gated_delta_rule`` and
  ``naive_chunk_gated_delta_rule`` (outputs, final states, gradients): an implementation
  written elsewhere, so a shared misreading of the paper would show. fla's package imports
  Triton, which a CPU machine need not have; ``naive.py`` itself needs only torch and einops,
  so it is loaded from the installed package by file path.
- CUDA only (skipped elsewhere, with the reason): fla's ``chunk_gated_delta_rule`` through
  ``fla_delta`` and mamba_ssm's ``mamba_chunk_scan_combined`` against our scans (outputs,
  gradients, final states), and the D and S layers with the kernel on and off.
- Everywhere: the per-device choice and the one-line notice.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hcomposer.primitives import fla_delta
from hcomposer.primitives.delta_rule import gated_delta_rule_chunked, gated_delta_rule_reference
from hcomposer.primitives.ssd import ssd_chunked
from load_script import script

CUDA = torch.cuda.is_available()


def _fla_naive():
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flash-linear-attention (fla-core) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "ops/gated_delta_rule/naive.py"
    if not path.is_file():
        pytest.skip(f"this fla version has no {path.name} reference")
    pytest.importorskip("einops")
    return script(path)


def _inputs(b, t, h, dk, dv, device="cpu", dtype=torch.float32, seed=0):
    """q, k (unit norm), v, beta in ``dtype``; the log-decays g and the state h0 in fp32."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=g)
    k = F.normalize(torch.randn(b, t, h, dk, generator=g), dim=-1)
    v = torch.randn(b, t, h, dv, generator=g)
    gate = F.logsigmoid(torch.randn(b, t, h, generator=g) + 2.0)  # log-decays <= 0
    beta = torch.sigmoid(torch.randn(b, t, h, generator=g))
    h0 = 0.5 * torch.randn(b, h, dk, dv, generator=g)
    dts = (dtype, dtype, dtype, torch.float32, dtype, torch.float32)
    return [
        x.to(device=device, dtype=d).requires_grad_()
        for x, d in zip((q, k, v, gate, beta, h0), dts)
    ]


def _grads(fn, xs, dout, dstate):
    for x in xs:
        x.grad = None
    o, s = fn(*xs)
    ((o * dout).sum() + (s * dstate).sum()).backward()
    return o.detach(), s.detach(), [x.grad.clone() for x in xs]


def _assert_close(ours, theirs, atol, rtol=0.0):
    o1, s1, g1 = ours
    o2, s2, g2 = theirs
    torch.testing.assert_close(o1, o2.to(o1.dtype), atol=atol, rtol=rtol)
    torch.testing.assert_close(s1, s2.to(s1.dtype), atol=atol, rtol=rtol)
    for i, (a, b) in enumerate(zip(g1, g2)):
        msg = f"gradient of input {i}"
        torch.testing.assert_close(
            a, b.to(a.dtype), atol=atol, rtol=rtol, msg=lambda m, s=msg: f"{s}: {m}"
        )


@pytest.mark.parametrize("t,chunk", [(37, 16), (64, 64)])
def test_our_delta_rule_matches_fla_naive_on_cpu(t, chunk):
    naive = _fla_naive()
    xs = _inputs(2, t, 3, 8, 6)
    dout = torch.randn(2, t, 3, 6, generator=torch.Generator().manual_seed(1))
    dstate = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(2))

    def ours(q, k, v, g, beta, h0):
        return gated_delta_rule_chunked(q, k, v, g, beta, chunk, h0)

    def ours_loop(q, k, v, g, beta, h0):
        return gated_delta_rule_reference(q, k, v, g, beta, h0)

    def fla_recurrent(q, k, v, g, beta, h0):  # note fla's argument order: beta before g
        return naive.naive_recurrent_gated_delta_rule(
            q, k, v, beta, g, initial_state=h0, output_final_state=True
        )

    def fla_chunk(q, k, v, g, beta, h0):
        return naive.naive_chunk_gated_delta_rule(
            q, k, v, g, beta, chunk_size=chunk, initial_state=h0, output_final_state=True
        )

    theirs = _grads(fla_recurrent, xs, dout, dstate)
    _assert_close(_grads(ours, xs, dout, dstate), theirs, atol=2e-5)
    _assert_close(_grads(ours_loop, xs, dout, dstate), theirs, atol=2e-5)
    o, s, _ = _grads(fla_chunk, xs, dout, dstate)
    torch.testing.assert_close(o, theirs[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(s, theirs[1], atol=2e-5, rtol=0)


def test_cpu_inputs_never_take_the_kernel(monkeypatch, caplog):
    calls = []
    fake = dataclasses.replace(fla_delta._KERNEL, fn=lambda *a, **k: calls.append(1), looked=True)
    monkeypatch.setattr(fla_delta, "_KERNEL", fake)
    with caplog.at_level(logging.INFO, logger=fla_delta.__name__):
        assert not fla_delta.use_fast_delta(torch.device("cpu"), torch.float32)
    assert caplog.records == []
    from hcomposer.model import build_model

    model = build_model("D", shape="tiny", seed=0)
    model(torch.randint(0, 50, (1, 9)))
    assert calls == []


def test_cuda_fallback_is_announced_once(monkeypatch, caplog):
    fresh = dataclasses.replace(fla_delta._KERNEL, fn=None, looked=False, announced=False)
    monkeypatch.setattr(fla_delta, "_KERNEL", fresh)
    monkeypatch.setenv("HCOMPOSER_DELTA", "torch")
    cuda = torch.device("cuda")
    with caplog.at_level(logging.INFO, logger=fla_delta.__name__):
        assert not fla_delta.use_fast_delta(cuda, torch.bfloat16)
        assert not fla_delta.use_fast_delta(cuda, torch.bfloat16)
    assert len(caplog.records) == 1
    rec = caplog.records[0]
    assert rec.levelno == logging.WARNING and "\n" not in rec.getMessage()
    assert "HCOMPOSER_DELTA=torch" in rec.getMessage() and "hcomposer[cuda]" in rec.getMessage()


def test_kernel_path_is_chosen_for_cuda_when_usable(monkeypatch):
    usable = dataclasses.replace(fla_delta._KERNEL, fn=object(), looked=True, announced=True)
    monkeypatch.setattr(fla_delta, "_KERNEL", usable)
    cuda = torch.device("cuda")
    assert fla_delta.use_fast_delta(cuda, torch.bfloat16)
    assert fla_delta.use_fast_delta(cuda, torch.float32)
    assert not fla_delta.use_fast_delta(cuda, torch.float64)


# --- CUDA only -------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU (fused kernels run on CUDA only)"
)


@needs_cuda
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-3), (torch.bfloat16, 6e-2)])
def test_fla_kernel_matches_our_scan_on_cuda(dtype, atol):
    if not fla_delta.fast_delta_available():
        pytest.skip(f"fla's kernel is not usable: {fla_delta.fast_delta_reason()}")
    t, dv = 200, 64
    xs = _inputs(2, t, 4, 64, dv, device="cuda", dtype=dtype)
    dout = torch.randn(2, t, 4, dv, device="cuda", dtype=dtype)
    dstate = torch.randn(2, 4, 64, dv, device="cuda")

    def ours(q, k, v, g, beta, h0):
        return gated_delta_rule_chunked(q, k, v, g, beta, 64, h0)

    def theirs(q, k, v, g, beta, h0):
        return fla_delta.fla_gated_delta_rule(q, k, v, g, beta, 64, h0)

    _assert_close(_grads(theirs, xs, dout, dstate), _grads(ours, xs, dout, dstate), atol, 2e-2)


@needs_cuda
def test_d_layer_with_and_without_fla_on_cuda(monkeypatch):
    if not fla_delta.fast_delta_available():
        pytest.skip(f"fla's kernel is not usable: {fla_delta.fast_delta_reason()}")
    from hcomposer.model import build_model

    model = build_model("D", shape="tiny", seed=0).cuda()
    ids = torch.randint(0, 50, (2, 150), device="cuda")
    fast = model(ids)
    fast.float().pow(2).mean().backward()
    g_fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr("hcomposer.primitives.deltanet.use_fast_delta", lambda d, t: False)
    slow = model(ids)
    slow.float().pow(2).mean().backward()
    torch.testing.assert_close(fast, slow, atol=2e-3, rtol=2e-3)
    for a, p in zip(g_fast, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=2e-3, rtol=2e-2)


@needs_cuda
def test_mamba_ssm_kernel_matches_our_ssd_on_cuda():
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # not installed, or a broken Triton/CUDA build
        pytest.skip(f"mamba_ssm is not usable ({type(e).__name__})")
    gen = torch.Generator().manual_seed(0)
    b, t, h, p, ng, n = 2, 200, 4, 32, 1, 64

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    xs = [
        r(b, t, h, p),
        F.softplus(r(b, t, h) - 2.0),
        -torch.rand(h, generator=gen) - 0.1,
        r(b, t, ng, n),
        r(b, t, ng, n),
        0.3 * r(b, h, p, n),
    ]
    xs = [x.cuda().requires_grad_() for x in xs]
    dout = torch.randn(b, t, h, p, device="cuda")
    dstate = torch.randn(b, h, p, n, device="cuda")

    def ours(x, dt, A, B, C, h0):
        return ssd_chunked(x, dt, A, B, C, 64, h0)

    def theirs(x, dt, A, B, C, h0):
        y, s = mamba_chunk_scan_combined(
            x, dt, A, B, C, 64, initial_states=h0, return_final_states=True
        )
        return y, s.float()

    _assert_close(_grads(theirs, xs, dout, dstate), _grads(ours, xs, dout, dstate), 2e-3, 2e-2)
