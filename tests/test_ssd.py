"""The chunked SSD scan against the step-by-step recurrence: outputs, final states, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hcomposer.primitives.ssd import segsum, ssd_chunked, ssd_reference, ssd_step

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(b, t, h, p, g, n, *, seed=0, dtype=F64, decay_scale=1.0):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=dtype)

    x = r(b, t, h, p)
    dt = F.softplus(r(b, t, h) - 1.0)
    A = -torch.rand(h, generator=gen, dtype=dtype) * 2.0 * decay_scale - 0.05
    B, C = r(b, t, g, n), r(b, t, g, n)
    s0 = r(b, h, p, n)
    return x, dt, A, B, C, s0


@pytest.mark.parametrize("chunk", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("t", [1, 7, 16, 37])
@pytest.mark.parametrize("with_init", [False, True])
def test_chunked_equals_recurrence_outputs_and_state(chunk, t, with_init):
    x, dt, A, B, C, s0 = _inputs(2, t, 4, 3, 2, 5, seed=t * 100 + chunk)
    init = s0 if with_init else None
    y_ref, f_ref = ssd_reference(x, dt, A, B, C, init)
    y, f = ssd_chunked(x, dt, A, B, C, chunk, init)
    assert y.shape == (2, t, 4, 3) and f.shape == (2, 4, 3, 5)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", ["factored", "exact"])
@pytest.mark.parametrize(
    "chunk,t,groups,with_init",
    [(4, 13, 1, True), (8, 16, 2, False), (8, 21, 2, True), (5, 5, 4, True), (32, 11, 1, True)],
)
def test_chunked_equals_recurrence_gradients(chunk, t, groups, with_init, form):
    x, dt, A, B, C, s0 = _inputs(2, t, 4, 3, groups, 4, seed=7 + t)
    leaves = [v.clone().requires_grad_() for v in (x, dt, A, B, C, s0)]
    gen = torch.Generator().manual_seed(99)
    gy = torch.randn(2, t, 4, 3, generator=gen, dtype=F64)
    gf = torch.randn(2, 4, 3, 4, generator=gen, dtype=F64)

    def grads(fn):
        vs = [v.detach().clone().requires_grad_() for v in leaves]
        init = vs[5] if with_init else None
        y, f = fn(*vs[:5], init)
        # Both outputs carry a cotangent, so the final state's gradient path is checked too.
        ((y * gy).sum() + (f * gf).sum()).backward()
        return [v.grad for v in (vs if with_init else vs[:5])]

    ref = grads(ssd_reference)
    got = grads(lambda *a: ssd_chunked(*a[:5], chunk, a[5], form=form))
    names = ["x", "dt", "A", "B", "C", "initial_state"]
    for name, g_ref, g in zip(names, ref, got):
        assert g is not None, name
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


@pytest.mark.parametrize("chunk", [8, 64])
def test_factored_and_exact_forms_agree_and_strong_decays_fall_back(chunk):
    # Moderate decays: both forms equal the recurrence in fp64, outputs and final state.
    x, dt, A, B, C, s0 = _inputs(1, 150, 4, 3, 2, 5, seed=chunk)
    y_ref, f_ref = ssd_reference(x, dt, A, B, C, s0)
    for form in ("factored", "exact"):
        y, f = ssd_chunked(x, dt, A, B, C, chunk, s0, form=form)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10, msg=form)
        torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10, msg=form)
    # Decays past the factored form's limit in fp32 (a chunk's total log-decay below -60):
    # the default must still be finite and equal the fp64 recurrence, gradients included.
    dt32 = (dt * 40).float().requires_grad_()
    y, f = ssd_chunked(x.float(), dt32, A.float(), B.float(), C.float(), chunk, s0.float())
    (y.sum() + f.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(dt32.grad).all()
    y_ref, f_ref = ssd_reference(x, dt32.detach().double(), A, B, C, s0)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-3, atol=1e-3)  # fp32, |y| up to ~30
    with pytest.raises(ValueError, match="form"):
        ssd_chunked(x, dt, A, B, C, chunk, form="fast")


def test_reference_known_answer():
    # One head, p = n = 1, B = C = 1, constant dt and A: y_t = dt sum_{s<=t} r^(t-s) x_s
    # with r = exp(dt A), plus r^(t+1) times the initial state.
    t, dt0, a = 9, 0.3, -0.7
    x = torch.arange(1.0, t + 1, dtype=F64).view(1, t, 1, 1)
    dt = torch.full((1, t, 1), dt0, dtype=F64)
    A = torch.tensor([a], dtype=F64)
    ones = torch.ones(1, t, 1, 1, dtype=F64)
    s0 = torch.full((1, 1, 1, 1), 2.0, dtype=F64)
    y, f = ssd_reference(x, dt, A, ones, ones, s0)
    r = math.exp(dt0 * a)
    want = [
        dt0 * sum(r ** (i - s) * (s + 1) for s in range(i + 1)) + 2.0 * r ** (i + 1)
        for i in range(t)
    ]
    torch.testing.assert_close(y.flatten(), torch.tensor(want, dtype=F64))
    torch.testing.assert_close(f.flatten(), torch.tensor(want[-1:], dtype=F64))
    yc, _ = ssd_chunked(x, dt, A, ones, ones, 4, s0)
    torch.testing.assert_close(yc.flatten(), torch.tensor(want, dtype=F64))


def test_fp32_long_sequence_close_to_fp64_reference():
    x, dt, A, B, C, s0 = _inputs(1, 300, 4, 8, 1, 16, seed=3)
    y_ref, f_ref = ssd_reference(x, dt, A, B, C, s0)
    y, f = ssd_chunked(*(v.float() for v in (x, dt, A, B, C)), 64, s0.float())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f.double(), f_ref, rtol=1e-4, atol=1e-4)


def test_strong_decay_stays_finite():
    # Cumulative log-decay of about -1e4 over the sequence: a difference of prefix sums across
    # chunks would lose everything; gradients must not meet inf * 0 in the masked exp.
    x, dt, A, B, C, _ = _inputs(1, 256, 2, 4, 1, 4, seed=5, dtype=torch.float32, decay_scale=8)
    dt = dt * 3
    leaves = [v.clone().requires_grad_() for v in (x, dt, A, B, C)]
    y, f = ssd_chunked(*leaves, 32)
    (y.sum() + f.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(f).all()
    assert all(torch.isfinite(v.grad).all() for v in leaves)
    y_ref, _ = ssd_reference(*(v.double() for v in (x, dt, A, B, C)))
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)


def test_scan_is_fp32_under_bf16_autocast():
    x, dt, A, B, C, s0 = (v.float() for v in _inputs(1, 40, 2, 4, 1, 8, seed=11))
    y32, f32 = ssd_chunked(x, dt, A, B, C, 16, s0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac, f_ac = ssd_chunked(x, dt, A, B, C, 16, s0)
    assert y_ac.dtype == torch.float32 and f_ac.dtype == torch.float32
    torch.testing.assert_close(y_ac, y32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f_ac, f32, rtol=1e-6, atol=1e-6)


def test_step_matches_one_step_of_scan():
    x, dt, A, B, C, s0 = _inputs(2, 1, 4, 3, 2, 5, seed=4)
    y, new = ssd_step(s0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    yc, fc = ssd_chunked(x, dt, A, B, C, 8, s0)
    torch.testing.assert_close(y, yc[:, 0])
    torch.testing.assert_close(new, fc)


def test_segsum_definition():
    a = torch.randn(3, 6, dtype=F64)
    s = segsum(a)
    for i in range(6):
        for j in range(6):
            want = a[:, j + 1 : i + 1].sum(-1) if j <= i else torch.full((3,), -math.inf, dtype=F64)
            torch.testing.assert_close(s[:, i, j], want)


def test_matmul_flops_match_the_mamba2_cost_formula():
    from hcomposer.primitives.mamba2 import Mamba2
    from hcomposer.shapes import get_shape

    shape = get_shape("tiny").replace(ssm_groups=2)
    m = Mamba2(shape)
    T = 40  # not a multiple of the chunk (16): padding is computed and counted
    H, P, G, N = m.n_heads, m.head_dim, m.n_groups, m.d_state
    x, dt, A, B, C, s0 = (v.float() for v in _inputs(1, T, H, P, G, N, seed=2))
    for form in ("factored", "exact"):
        with FlopCounterMode(display=False) as counter:
            ssd_chunked(x, dt, A, B, C, m.chunk_size, s0, form=form)
        assert counter.get_total_flops() == pytest.approx(m.extra_flops_per_token(T) * T), form


def test_bad_shapes_raise():
    x, dt, A, B, C, s0 = _inputs(1, 5, 4, 3, 2, 5)
    with pytest.raises(ValueError, match="groups"):
        ssd_chunked(x[:, :, :3], dt[:, :, :3], A[:3], B, C, 4)  # 2 groups, 3 heads
    with pytest.raises(ValueError, match="initial_state"):
        ssd_chunked(x, dt, A, B, C, 4, s0[:, :2])
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunked(x, dt, A, B, C, 0)
