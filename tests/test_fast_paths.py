"""Each training fast path against the plain form it replaces: values and gradients.

The fused RMSNorm (``F.rms_norm``), RoPE from kept tables (``rope_tables``), the fused AdamW on
CPU, and a whole model with every fast path on against the same model with them off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hcomposer import build_model
from hcomposer.model import ChunkedCrossEntropy, lm_loss
from hcomposer.primitives import RMSNorm
from hcomposer.primitives.attention import (
    apply_rope,
    apply_rope_tables,
    rope_angles,
    rope_tables,
)
from hcomposer.training.step import make_optimizer, param_groups


def _grads(fn, *tensors):
    out = fn(*tensors)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    grads = torch.autograd.grad(out, tensors, g)
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rmsnorm_equals_plain(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 48).to(dtype).requires_grad_()
    results = []
    for fused in (False, True):
        norm.fused = fused
        results.append(_grads(lambda t, w: norm(t), x, norm.weight))
    (y0, g0), (y1, g1) = results
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert y1.dtype == y0.dtype == dtype
    torch.testing.assert_close(y1, y0, atol=tol, rtol=tol)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_tables_equal_apply_rope(dtype):
    torch.manual_seed(0)
    hd, theta = 16, 10000.0
    pos = torch.arange(3, 3 + 7)
    x = torch.randn(2, 3, 7, hd).to(dtype).requires_grad_()
    cos, sin = rope_angles(pos, hd, theta)
    ref, gref = _grads(lambda t: apply_rope(t, cos, sin), x)
    cos2, ssin = rope_tables(pos, hd, theta)
    out, gout = _grads(lambda t: apply_rope_tables(t, cos2, ssin), x)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(gout[0], gref[0], atol=tol, rtol=tol)


def _set_fast(model, on: bool):
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.fused = on
        if hasattr(m, "fast_rope"):
            m.fast_rope = on


@pytest.mark.parametrize("pattern", ["(AF)*2", "AWFE", "SFDF"])
def test_model_fast_paths_equal_plain_loss_and_gradients(pattern):
    """A model with every fast path on, and off: the same loss and gradients, twice in a row
    (the second forward reads the kept RoPE tables)."""
    model = build_model(pattern, shape="tiny", seed=0)
    tokens = torch.randint(
        0, model.shape.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0)
    )
    x, y = tokens[:, :-1], tokens[:, 1:]
    params = [p for p in model.parameters()]

    def loss_and_grads():
        loss = lm_loss(model(x), y)
        return loss.detach(), torch.autograd.grad(loss, params)

    _set_fast(model, False)
    ref_loss, ref_grads = loss_and_grads()
    _set_fast(model, True)
    for _ in range(2):
        loss, grads = loss_and_grads()
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_kept_rope_tables_made_in_inference_mode_do_not_break_training():
    model = build_model("AF", shape="tiny", seed=0)
    x = torch.randint(0, model.shape.vocab_size, (1, 8))
    with torch.inference_mode():
        model(x)
    model(x).float().sum().backward()  # would raise if inference tensors were saved
    assert model.layers[0].mixer.q_proj.weight.grad is not None


def test_fused_adamw_on_cpu_follows_the_loop():
    """make_optimizer's fused CPU AdamW against torch's per-parameter loop, three steps."""
    torch.manual_seed(0)
    a = build_model("AF", shape="tiny", seed=0)
    b = build_model("AF", shape="tiny", seed=0)
    fused = make_optimizer(a, lr=1e-2, weight_decay=0.1, device=torch.device("cpu"))
    assert fused.defaults["fused"]
    loop = torch.optim.AdamW(param_groups(b, 0.1), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    for step in range(3):
        for pa, pb in zip(a.parameters(), b.parameters()):
            g = torch.randn(pa.shape, generator=torch.Generator().manual_seed(step))
            pa.grad, pb.grad = g.clone(), g.clone()
        fused.step()
        loop.step()
    start = build_model("AF", shape="tiny", seed=0)
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), start.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)
        assert not torch.equal(pa, p0)  # the steps moved every parameter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_plain_loss_and_gradient(dtype, monkeypatch):
    """lm_loss (blocks of 3 rows here, the last one short, with ignored targets) against
    F.cross_entropy on an fp32 copy of the logits."""
    monkeypatch.setattr(ChunkedCrossEntropy, "BLOCK", 3 * 40)
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 7, 40, generator=gen)).to(dtype).requires_grad_()
    targets = torch.randint(0, 40, (2, 7), generator=gen)
    targets[0, 2] = targets[1, 6] = -100
    ref = F.cross_entropy(logits.float().reshape(-1, 40), targets.reshape(-1), ignore_index=-100)
    (gref,) = torch.autograd.grad(ref, logits)
    loss = lm_loss(logits, targets)
    (g,) = torch.autograd.grad(loss, logits)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    tol = 1e-7 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(g, gref, atol=tol, rtol=1e-2)
    assert g[0, 2].abs().max() == 0 and g[1, 6].abs().max() == 0  # ignored rows get nothing
    assert torch.isnan(lm_loss(logits, torch.full_like(targets, -100)))  # as F.cross_entropy
