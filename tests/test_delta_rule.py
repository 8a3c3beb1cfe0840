"""The chunked gated delta rule against the step-by-step recurrence: outputs, states, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hcomposer.primitives.delta_rule import (
    chunked_flops,
    gated_delta_rule_chunked,
    gated_delta_rule_reference,
    gated_delta_rule_step,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(b, t, h, dk, dv, *, seed=0, dtype=F64, decay_scale=1.0):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=dtype)

    q = r(b, t, h, dk)
    k = F.normalize(r(b, t, h, dk), dim=-1)
    v = r(b, t, h, dv)
    g = -F.softplus(r(b, t, h)) * decay_scale
    beta = torch.sigmoid(r(b, t, h))
    s0 = r(b, h, dk, dv)
    return q, k, v, g, beta, s0


@pytest.mark.parametrize("chunk", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("t", [1, 7, 16, 37])
@pytest.mark.parametrize("with_init", [False, True])
def test_chunked_equals_recurrence_outputs_and_state(chunk, t, with_init):
    q, k, v, g, beta, s0 = _inputs(2, t, 3, 4, 5, seed=t * 100 + chunk)
    init = s0 if with_init else None
    o_ref, f_ref = gated_delta_rule_reference(q, k, v, g, beta, init)
    o, f = gated_delta_rule_chunked(q, k, v, g, beta, chunk, init)
    assert o.shape == (2, t, 3, 5) and f.shape == (2, 3, 4, 5)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "chunk,t,with_init",
    [(4, 13, True), (8, 16, False), (8, 21, True), (5, 5, True), (32, 11, True)],
)
def test_chunked_equals_recurrence_gradients(chunk, t, with_init):
    q, k, v, g, beta, s0 = _inputs(2, t, 3, 4, 6, seed=7 + t)
    leaves = (q, k, v, g, beta, s0)
    gen = torch.Generator().manual_seed(99)
    go = torch.randn(2, t, 3, 6, generator=gen, dtype=F64)
    gf = torch.randn(2, 3, 4, 6, generator=gen, dtype=F64)

    def grads(fn):
        vs = [x.detach().clone().requires_grad_() for x in leaves]
        init = vs[5] if with_init else None
        o, f = fn(*vs[:5], init)
        # Both results carry a cotangent, so the final state's gradient path is checked too.
        ((o * go).sum() + (f * gf).sum()).backward()
        return [x.grad for x in (vs if with_init else vs[:5])]

    ref = grads(gated_delta_rule_reference)
    got = grads(lambda *a: gated_delta_rule_chunked(*a[:5], chunk, a[5]))
    names = ["q", "k", "v", "g", "beta", "initial_state"]
    for name, g_ref, g_got in zip(names, ref, got):
        assert g_got is not None, name
        torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_step_equals_one_step_of_reference_and_of_chunked():
    q, k, v, g, beta, s0 = _inputs(2, 1, 3, 4, 5, seed=4)
    o, new = gated_delta_rule_step(s0, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0])
    o_ref, f_ref = gated_delta_rule_reference(q, k, v, g, beta, s0)
    o_c, f_c = gated_delta_rule_chunked(q, k, v, g, beta, 8, s0)
    torch.testing.assert_close(o, o_ref[:, 0])
    torch.testing.assert_close(new, f_ref)
    torch.testing.assert_close(o, o_c[:, 0])
    torch.testing.assert_close(new, f_c)


def test_reference_known_answers():
    # beta = 1, alpha = 1, orthonormal keys: the state is an exact key -> value memory, so
    # reading key i returns v_i (scaled by the q scale), whatever else was written.
    t, dk = 3, 4
    k = torch.eye(dk, dtype=F64)[:t].view(1, t, 1, dk)
    v = torch.arange(1.0, 1 + 2 * t, dtype=F64).view(1, t, 1, 2)
    ones, zeros = torch.ones(1, t, 1, dtype=F64), torch.zeros(1, t, 1, dtype=F64)
    _, state = gated_delta_rule_reference(k, k, v, zeros, ones, scale=1.0)
    torch.testing.assert_close(state[0, 0, :t], v[0, :, 0])
    # Writing a new value under the same key with beta = 1 replaces the old one (the delta
    # rule), where plain linear attention would add them.
    k2 = torch.cat([k[:, :1], k[:, :1]], dim=1)
    v2 = torch.tensor([[[[1.0, 0.0]], [[0.0, 5.0]]]], dtype=F64)
    o, _ = gated_delta_rule_reference(k2, k2, v2, zeros[:, :2], ones[:, :2], scale=1.0)
    torch.testing.assert_close(o[0, 1, 0], torch.tensor([0.0, 5.0], dtype=F64))
    # One key, beta = b, decay a: s_t = a (1 - b) s_{t-1} + b v_t (a scalar recurrence).
    a, b, T = 0.8, 0.3, 6
    kk = torch.ones(1, T, 1, 1, dtype=F64)
    vv = torch.arange(1.0, T + 1, dtype=F64).view(1, T, 1, 1)
    gg = torch.full((1, T, 1), math.log(a), dtype=F64)
    bb = torch.full((1, T, 1), b, dtype=F64)
    o, _ = gated_delta_rule_reference(kk, kk, vv, gg, bb, scale=1.0)
    s, want = 0.0, []
    for i in range(T):
        s = a * (1 - b) * s + b * (i + 1)
        want.append(s)
    torch.testing.assert_close(o.flatten(), torch.tensor(want, dtype=F64))
    oc, _ = gated_delta_rule_chunked(kk, kk, vv, gg, bb, 4, scale=1.0)
    torch.testing.assert_close(oc.flatten(), torch.tensor(want, dtype=F64))


def test_fp32_long_sequence_close_to_fp64_reference():
    q, k, v, g, beta, s0 = _inputs(1, 300, 2, 16, 8, seed=3)
    o_ref, f_ref = gated_delta_rule_reference(q, k, v, g, beta, s0)
    o, f = gated_delta_rule_chunked(*(x.float() for x in (q, k, v, g, beta)), 64, s0.float())
    assert o.dtype == torch.float32 and f.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f.double(), f_ref, rtol=1e-4, atol=1e-4)


def test_strong_decay_and_full_strength_stay_finite():
    # Cumulative log-decay of about -1e3 per chunk and beta close to 1: exponents stay <= 0,
    # and gradients must not meet inf * 0 in the masked exp.
    q, k, v, g, beta, _ = _inputs(1, 256, 2, 8, 8, seed=5, dtype=torch.float32, decay_scale=30)
    beta = 0.5 + 0.5 * beta
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
    o, f = gated_delta_rule_chunked(*leaves, 64)
    (o.sum() + f.sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(f).all()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    o_ref, _ = gated_delta_rule_reference(*(x.double() for x in (q, k, v, g, beta)))
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-4)


def test_scan_is_fp32_under_bf16_autocast():
    q, k, v, g, beta, s0 = (x.float() for x in _inputs(1, 40, 2, 8, 4, seed=11))
    o32, f32 = gated_delta_rule_chunked(q, k, v, g, beta, 16, s0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_ac, f_ac = gated_delta_rule_chunked(q, k, v, g, beta, 16, s0)
    assert o_ac.dtype == torch.float32 and f_ac.dtype == torch.float32
    torch.testing.assert_close(o_ac, o32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f_ac, f32, rtol=1e-6, atol=1e-6)


def test_matches_transformers_qwen3_next_torch_chunk_gated_delta_rule():
    # An external, independent implementation of the same recurrence (the pure-PyTorch path
    # of Qwen3-Next in transformers); same layout: state [b, h, d_k, d_v], q scaled by
    # d_k ** -0.5, g the log-decay.
    pytest.importorskip("transformers")
    mod = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    theirs = getattr(mod, "torch_chunk_gated_delta_rule", None)
    if theirs is None:
        pytest.skip("this transformers has no torch_chunk_gated_delta_rule")
    q, k, v, g, beta, s0 = _inputs(2, 45, 3, 8, 6, seed=21)
    o, f = gated_delta_rule_chunked(q, k, v, g, beta, 16, s0)
    o_t, f_t = theirs(q, k, v, g, beta, chunk_size=16, initial_state=s0, output_final_state=True)
    # transformers computes in fp32 whatever the input dtype.
    torch.testing.assert_close(o, o_t.to(F64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f, f_t.to(F64), rtol=1e-5, atol=1e-5)


def _solve_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    # A unit lower-triangular solve: L (L - 1) / 2 multiply-adds per right-hand side column.
    L = a_shape[-1]
    return math.prod(b_shape[:-2]) * L * (L - 1) * b_shape[-1]


@pytest.mark.parametrize("t,chunk", [(40, 16), (16, 64), (1, 8)])
def test_matmul_flops_match_the_cost_formula(t, chunk):
    h, dk, dv = 3, 8, 12
    q, k, v, g, beta, s0 = (x.float() for x in _inputs(2, t, h, dk, dv, seed=2))
    mapping = {torch.ops.aten.linalg_solve_triangular: _solve_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        gated_delta_rule_chunked(q, k, v, g, beta, chunk, s0)
    assert counter.get_total_flops() == pytest.approx(2 * chunked_flops(t, h, dk, dv, chunk))


def test_bad_shapes_raise():
    q, k, v, g, beta, s0 = _inputs(1, 5, 2, 4, 3)
    with pytest.raises(ValueError, match="expects q and k"):
        gated_delta_rule_chunked(q, k[..., :3], v, g, beta, 4)
    with pytest.raises(ValueError, match="must match"):
        gated_delta_rule_chunked(q, k, v, g[:, :4], beta, 4)
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule_chunked(q, k, v, g, beta, 4, s0[:, :1])
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_rule_chunked(q, k, v, g, beta, 0)
