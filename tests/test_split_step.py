"""The split step (``train_step(batch_threads=N)``): each micro-batch's row slices run forward and
backward in their own threads; the loss, the gradients and the updated weights must equal the
plain step's.

Numerics: the split step sums the slices' gradients (each already scaled by its share of the
rows) where the plain step's backward sums over all rows inside each op, so the two agree up to
rounding only. The model runs in fp64 (~1e-16 relative), except where it computes in fp32 on
purpose: RMSNorm (its weights' gradients differ by ~2e-7 relative, measured) and the loss
(``lm_loss`` takes fp32 logits). Tolerances: 1e-10 relative for the fp64 gradients, 1e-5 for
the norms' and for the loss; a wrong share is an error of ~1e-1 (test_a_wrong_share_is_caught).
The split step itself is deterministic: gradients are summed in slice order, whichever thread
finishes first; two runs are compared bitwise.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn

from hcomposer.architecture import Architecture
from hcomposer.model import build_model, lm_loss
from hcomposer.training.step import make_optimizer, split_rows, train_step

torch.set_num_threads(1)
CPU = torch.device("cpu")


def _model(seed: int = 0, pattern: str = "AF") -> nn.Module:
    arch = Architecture.parse(pattern, shape="tiny")
    arch = arch.with_shape(arch.shape.replace(vocab_size=64, max_seq_len=16))
    return build_model(arch, seed=seed, dtype=torch.float64)


def _batches(rows: int, accum: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(accum):
        tokens = torch.randint(0, 64, (rows, 13), generator=gen)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def _step(model, batches, batch_threads, *, optimizer=True, dtype="fp32", grad_clip=1.0):
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    loss, norm = train_step(
        lambda x, y: lm_loss(model(x), y),
        batches,
        opt,
        device=CPU,
        dtype=dtype,
        grad_clip=grad_clip,
        batch_threads=batch_threads,
    )
    return loss, norm


def _grads(model, batches, batch_threads):
    """The gradients ``train_step`` would step with (the optimiser's step is skipped)."""
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    seen = {}

    def keep(*_args, **_kw):
        seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    opt.step = keep
    train_step(
        lambda x, y: lm_loss(model(x), y), batches, opt, device=CPU, dtype="fp32",
        batch_threads=batch_threads,
    )  # fmt: skip
    return seen


def test_split_rows_covers_the_rows_in_order():
    assert split_rows(4, 2) == [(0, 2), (2, 4)]
    assert split_rows(5, 2) == [(0, 3), (3, 5)]
    assert split_rows(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert split_rows(1, 2) == [(0, 1)]
    assert split_rows(3, 1) == [(0, 3)]


@pytest.mark.parametrize(
    "rows,accum,threads", [(4, 1, 2), (5, 1, 2), (4, 3, 2), (7, 2, 3), (1, 2, 2)]
)
def test_split_gradients_equal_the_plain_step(rows, accum, threads):
    batches = _batches(rows, accum)
    plain = _grads(_model(), batches, 1)
    split = _grads(_model(), batches, threads)
    assert plain.keys() == split.keys() and plain
    for name, g in plain.items():
        rtol = 1e-5 if "norm" in name else 1e-10
        torch.testing.assert_close(split[name], g, rtol=rtol, atol=1e-12 * rtol / 1e-10)


@pytest.mark.parametrize("rows,accum", [(4, 1), (5, 2)])
def test_split_step_equals_the_plain_step(rows, accum):
    batches = _batches(rows, accum)
    m1, m2 = _model(), _model()
    loss1, norm1 = _step(m1, batches, 1)
    loss2, norm2 = _step(m2, batches, 2)
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    assert norm2 == pytest.approx(norm1, rel=1e-6)
    assert norm1 > 1.0  # the clip acted: the split's norm decides the same scaling
    changed = 0
    for a, b, a0 in zip(m1.parameters(), m2.parameters(), _model().parameters()):
        # AdamW's first step moves a weight by lr * g / (|g| + eps): a gradient known to
        # ~1e-7 relative (the norms') moves it to ~lr * 1e-7 absolute.
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-8)
        changed += not torch.equal(a, a0)
    assert changed == len(list(m1.parameters()))


def test_a_wrong_share_is_caught():
    # The comparison above can fail: slices weighted 1/2 each instead of 3/5 and 2/5.
    batches = _batches(5, 1)
    plain = _grads(_model(), batches, 1)
    model = _model()
    for x, y in batches:
        for sl in (slice(0, 3), slice(3, 5)):
            (lm_loss(model(x[sl]), y[sl]) / 2).backward()
    wrong = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(not torch.allclose(wrong[n], g, rtol=1e-6) for n, g in plain.items())


def test_split_step_is_deterministic():
    batches = _batches(6, 2)
    m1, m2 = _model(), _model()
    _step(m1, batches, 2)
    _step(m2, batches, 2)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_slices_run_in_threads_concurrently():
    # Both slices' forwards are inside the model at once: a barrier that needs two threads.
    barrier = threading.Barrier(2, timeout=30)
    names = set()
    model = _model()

    def loss_fn(x, y):
        names.add(threading.current_thread().name)
        barrier.wait()
        return lm_loss(model(x), y)

    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    loss, norm = train_step(loss_fn, _batches(4, 1), opt, device=CPU, dtype="fp32", batch_threads=2)
    assert len(names) == 2 and math.isfinite(loss) and norm is not None


def test_autocast_is_entered_in_every_thread():
    dtypes = []
    model = _model()

    def loss_fn(x, y):
        dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return lm_loss(model(x), y)

    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    train_step(loss_fn, _batches(4, 1), opt, device=CPU, dtype="bf16", batch_threads=2)
    assert dtypes == [torch.bfloat16, torch.bfloat16]


def test_non_finite_loss_updates_nothing():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    x, y = _batches(4, 1)[0]
    x = x.clone()
    x[2, 0] = -1  # marks the second slice (rows 2..3) alone as going bad

    def marked(xs, ys):
        loss = lm_loss(model(xs.clamp(min=0)), ys)
        return loss * math.inf if bool((xs == -1).any()) else loss

    loss, norm = train_step(marked, [(x, y)], opt, device=CPU, dtype="fp32", batch_threads=2)
    assert not math.isfinite(loss) and norm is None
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())


def test_an_error_in_a_thread_is_raised_after_every_thread_ends():
    model = _model()
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1)

    def loss_fn(x, y):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("boom in a batch thread")
        return lm_loss(model(x), y)

    with pytest.raises(RuntimeError, match="boom"):
        train_step(loss_fn, _batches(4, 1), opt, device=CPU, dtype="fp32", batch_threads=2)


def test_split_refuses_ddp_and_a_missing_optimizer():
    model = _model()
    loss_fn = lambda x, y: lm_loss(model(x), y)  # noqa: E731
    with pytest.raises(ValueError, match="optimizer"):
        train_step(loss_fn, _batches(4, 1), None, device=CPU, dtype="fp32", batch_threads=2)
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    with pytest.raises(ValueError, match="DDP"):
        train_step(
            loss_fn, _batches(4, 1), opt, device=CPU, dtype="fp32", batch_threads=2,
            no_sync=lambda: None,
        )  # fmt: skip
