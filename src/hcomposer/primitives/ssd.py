"""The SSD scan of Mamba-2 (Dao & Gu 2024): chunked form for training, step form for decoding.

The recurrence, per head h, with a scalar decay per step (Mamba-2's "scalar times identity" A):

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t B_t^T       state: [head_dim, d_state]
    y_t     = state_t C_t                                          y:     [head_dim]

B and C are shared by the heads of one group (``n_heads // n_groups`` heads per group).

``ssd_chunked`` computes the same thing in blocks of ``chunk_size`` steps: inside a chunk it is
a masked, attention-like product (C B^T weighted by the decay between positions, times x); the
chunks are linked by passing one state per chunk, so the work is linear in the sequence length
and almost all of it is batched matrix multiplication. ``ssd_reference`` is the plain loop over
time, kept readable on purpose: the tests hold the chunked form to it, outputs and gradients.

All arithmetic runs in fp32, even under bf16 autocast: the decays are exponentials of sums over
up to ``chunk_size`` steps, and bf16's 8-bit mantissa would turn them into noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ssd_chunked", "ssd_reference", "ssd_step", "segsum", "work_dtype"]


def _check(x, dt, A, B, C, initial_state) -> tuple[int, int, int, int, int, int]:
    if x.dim() != 4 or dt.dim() != 3 or A.dim() != 1 or B.dim() != 4 or C.dim() != 4:
        raise ValueError(
            "ssd expects x [b,t,h,p], dt [b,t,h], A [h], B and C [b,t,g,n]; got "
            f"{tuple(x.shape)}, {tuple(dt.shape)}, {tuple(A.shape)}, {tuple(B.shape)}, "
            f"{tuple(C.shape)}"
        )
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if dt.shape != (b, t, h) or A.shape != (h,) or B.shape != (b, t, g, n) or C.shape != B.shape:
        raise ValueError("ssd: dt, A, B, C do not match x in batch, time or heads")
    if h % g:
        raise ValueError(f"ssd: {g} groups do not divide {h} heads")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(
            f"ssd: initial_state must be {(b, h, p, n)}, got {tuple(initial_state.shape)}"
        )
    return b, t, h, p, g, n


def segsum(a: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for j <= i, and -inf above the diagonal.

    Summed by a cumsum over a masked copy rather than as a difference of two prefix sums, so
    it stays exact when the prefix sums are large (the sums span the whole sequence when used
    across chunks). exp(segsum(a)) is the matrix of decays from step j to step i.
    """
    n = a.shape[-1]
    ones = torch.ones(n, n, dtype=torch.bool, device=a.device)
    strict = torch.tril(ones, diagonal=-1)
    out = a[..., :, None].expand(*a.shape, n).masked_fill(~strict, 0.0).cumsum(dim=-2)
    return out.masked_fill(~torch.tril(ones), float("-inf"))


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan in chunks.

    x [b,t,h,p]; dt [b,t,h] (positive, softplus already applied); A [h] (negative);
    B, C [b,t,g,n]; initial_state [b,h,p,n] or None (zeros).
    Returns y [b,t,h,p] in x's dtype and the final state [b,h,p,n] in fp32 (fp64 if x is
    fp64). Any t works:
    the last chunk is padded with dt = 0 (no decay, no input), which leaves the state alone.
    """
    b, t, h, p, g, n = _check(x, dt, A, B, C, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    out_dtype = x.dtype
    with torch.autocast(device_type=x.device.type, enabled=False):
        L = min(chunk_size, max(t, 1))
        nc = -(-t // L)
        pad = nc * L - t
        work = work_dtype(x)
        x, dt, A, B, C = (v.to(work) for v in (x, dt, A, B, C))
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
            dt = F.pad(dt, (0, 0, 0, pad))
            B = F.pad(B, (0, 0, 0, 0, 0, pad))
            C = F.pad(C, (0, 0, 0, 0, 0, pad))
        hg = h // g
        # Heads are indexed (group, head-in-group): B and C belong to a group and are used by
        # its heads without being copied per head. Shapes: c chunks of l (or s) steps.
        a_cum = (dt * A).view(b, nc, L, g, hg).permute(0, 3, 4, 1, 2).cumsum(-1)  # [b,g,hg,c,l]
        xdt = (x * dt[..., None]).view(b, nc, L, g, hg, p)
        xh = xdt.permute(0, 3, 4, 1, 2, 5)  # [b,g,hg,c,l,p]
        Bc = B.view(b, nc, L, g, n).permute(0, 3, 1, 2, 4)  # [b,g,c,l,n]
        Cc = C.view(b, nc, L, g, n).permute(0, 3, 1, 2, 4)

        # 1. Inside each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(a_{s+1} + ... + a_l) dt_s x_s.
        # Within a chunk the prefix sums stay small, so their difference is accurate (the
        # mamba_ssm kernels do the same); the mask is applied before exp, never after, so the
        # upper triangle is exp(-inf) = 0 with a zero gradient instead of an overflow.
        scores = Cc @ Bc.transpose(-1, -2)  # [b,g,c,l,s], once per group
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        decay = (a_cum[..., :, None] - a_cum[..., None, :]).masked_fill_(~causal, float("-inf"))
        y_diag = (scores[:, :, None] * decay.exp_()) @ xh  # [b,g,hg,c,l,p]

        # 2. Each chunk's own contribution to the state at its end, all heads of a group in
        # one product: [c, hg*p, l] @ [c, l, n].
        to_end = (a_cum[..., -1:] - a_cum).exp()  # [b,g,hg,c,l]
        xs = (xh * to_end[..., None]).permute(0, 1, 3, 4, 2, 5).reshape(b, g, nc, L, hg * p)
        local = xs.transpose(-1, -2) @ Bc  # [b,g,c,hg*p,n]

        # 3. Pass states across chunks: start[c] = sum_{j<=c} exp(decay j->c) local[j-1], with
        # the initial state as entry 0 and the final state as entry nc. One small matrix
        # product ((c+1)^2 per head) with the exact segsum, since these sums span the sequence.
        if initial_state is None:
            init = local.new_zeros(b, g, 1, hg * p, n)
        else:
            init = initial_state.to(work).reshape(b, g, 1, hg * p, n)
        states = torch.cat([init, local], dim=2).view(b, g, nc + 1, hg, p * n).transpose(2, 3)
        chunk_decay = segsum(F.pad(a_cum[..., -1], (1, 0))).exp()  # [b,g,hg,c+1,c+1]
        states = chunk_decay @ states  # [b,g,hg,c+1,p*n]
        final = states[:, :, :, -1]
        starts = states[:, :, :, :-1].transpose(2, 3).reshape(b, g, nc, hg * p, n)

        # 4. What each chunk's start state adds to its outputs, decayed to each position.
        y_off = (Cc @ starts.transpose(-1, -2)).view(b, g, nc, L, hg, p)
        y_off = y_off * a_cum.exp().permute(0, 1, 3, 4, 2)[..., None]

        y = y_diag.permute(0, 3, 4, 1, 2, 5) + y_off.permute(0, 2, 3, 1, 4, 5)  # [b,c,l,g,hg,p]
        y = y.reshape(b, nc * L, h, p)[:, :t]
    return y.to(out_dtype), final.reshape(b, h, p, n)


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the scans compute in."""
    # fp32 for fp32, bf16 and fp16 inputs; fp64 stays fp64 (tight gradient checks in tests).
    return torch.promote_types(x.dtype, torch.float32)


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence: state [b,h,p,n] (fp32), x [b,h,p], dt [b,h], B, C [b,g,n].

    Returns (y [b,h,p], new state [b,h,p,n]), both in fp32 (fp64 for fp64 inputs); the
    caller decides where the state lives (decoding copies it into the cache).
    """
    h, g = x.shape[1], B.shape[1]
    work = work_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, dt, A, B, C, state = (v.to(work) for v in (x, dt, A, B, C, state))
        Bh = B.repeat_interleave(h // g, dim=1)  # [b,h,n]
        Ch = C.repeat_interleave(h // g, dim=1)
        decay = torch.exp(dt * A)[..., None, None]
        new = state * decay + (dt[..., None] * x)[..., None] * Bh[:, :, None, :]
        y = (new @ Ch[..., None]).squeeze(-1)
    return y, new


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one step at a time (slow, readable): the reference for ``ssd_chunked``.

    Same arguments and results as ``ssd_chunked`` (without the chunk size).
    """
    b, t, h, p, g, n = _check(x, dt, A, B, C, initial_state)
    if initial_state is None:
        state = x.new_zeros(b, h, p, n, dtype=work_dtype(x))
    else:
        state = initial_state.to(work_dtype(x))
    ys = []
    for i in range(t):
        y, state = ssd_step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i])
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)
    return y.to(x.dtype), state
