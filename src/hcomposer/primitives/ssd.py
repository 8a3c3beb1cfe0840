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

Inside a chunk, the decay between steps s <= l is exp(a_l - a_s) (a: prefix sums of dt A). The
factored form writes it exp(a_l) exp(-a_s), so one masked C B^T per group serves all its heads
and no [l, s] matrix is built per head (the scan's elementwise work then scales with the
sequence, not with its chunks' squares); it is taken where every chunk's total decay keeps
exp(-a) far from overflow, else the exact form builds each head's decay matrix.

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
    it stays exact when the prefix sums are large. exp(segsum(a)) is the matrix of decays from
    step j to step i (the scans no longer build it across chunks: they pass states chunk by
    chunk instead; kept for callers and the tests).
    """
    n = a.shape[-1]
    ones = torch.ones(n, n, dtype=torch.bool, device=a.device)
    strict = torch.tril(ones, diagonal=-1)
    out = a[..., :, None].expand(*a.shape, n).masked_fill(~strict, 0.0).cumsum(dim=-2)
    return out.masked_fill(~torch.tril(ones), float("-inf"))


# The factored form multiplies inputs by exp(-a) summed over up to a chunk: it is used only
# while every chunk's total log-decay stays above -limit, far from the work dtype's overflow
# (exp(60) ~ 1e26 in fp32); elsewhere the chunk is halved, and below MIN_FACTORED_CHUNK the
# exact form (one decay matrix per head) is used.
FACTOR_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}
MIN_FACTORED_CHUNK = 16


class _ChunkStates(torch.autograd.Function):
    """The recurrence from chunk to chunk: s[0] = init and, with w = exp(log_w),
    s[c+1] = w[c] s[c] + local[c]  (exact form) or  w[c] (s[c] + local[c])  (factored form).

    local [c, ..., q] (each chunk's own contribution, q = p*n), log_w [c, ...] (each chunk's
    total log-decay), init [..., q]; returns the start states s[0..c-1] [c, ..., q] and the
    final state s[c] [..., q]. One multiply-add per chunk forward and one backward, with no
    autograd graph between them: linear in the number of chunks, where the matrix form over
    all pairs of chunks is quadratic.
    """

    @staticmethod
    def forward(ctx, local, log_w, init, factored):
        w = log_w.exp()  # broadcasts against one chunk's states
        nc = local.shape[0]
        states = local.new_empty((nc + 1, *local.shape[1:]))
        states[0] = init
        for c in range(nc):
            if factored:
                torch.mul(states[c] + local[c], w[c], out=states[c + 1])
            else:
                torch.addcmul(local[c], states[c], w[c], out=states[c + 1])
        ctx.factored = factored
        ctx.save_for_backward(states, w)
        return states[:nc], states[nc]

    @staticmethod
    def backward(ctx, d_starts, d_final):
        states, w = ctx.saved_tensors
        # The full gradient of s[c] is its own cotangent plus what flows back from s[c+1].
        d_next = torch.empty_like(d_starts)  # d_next[c]: the gradient of s[c+1]
        nc = d_next.shape[0]
        d_next[nc - 1] = d_final
        for c in range(nc - 1, 0, -1):
            torch.addcmul(d_starts[c], d_next[c], w[c], out=d_next[c - 1])
        acc = torch.addcmul(d_starts[0], d_next[0], w[0])  # the gradient of s[0]
        if ctx.factored:
            # d log_w[c] = <d s[c+1], w[c] (s[c] + local[c])> = <d s[c+1], s[c+1]>.
            d_log_w = (d_next * states[1:]).sum_to_size(w.shape)
            return d_next.mul_(w), d_log_w, acc, None
        d_log_w = (d_next * states[:-1]).sum_to_size(w.shape) * w
        return d_next, d_log_w, acc, None


class _ChunkDiagonal(torch.autograd.Function):
    """Inside each chunk: y = (scores * exp(segment sums of a), masked causal) @ x, per head.

    a [..., c, l] (prefix sums of the log-decays inside each chunk), scores [..., c, l, s]
    (C B^T, broadcast over the heads of a group: the head dim is -4 of x, absent in scores),
    x [..., c, l, p] (dt x). The decay matrix is built once (difference, mask before the exp,
    exp) and kept with the masked product for the backward, which is written out: the
    gradient of the exponent is (dM * M), whose row sums minus column sums give da.
    """

    @staticmethod
    def forward(ctx, a, scores, x):
        L = a.shape[-1]
        upper = torch.ones(L, L, dtype=torch.bool, device=a.device).triu_(1)
        decay = (a[..., :, None] - a[..., None, :]).masked_fill_(upper, float("-inf")).exp_()
        masked = decay * scores.unsqueeze(-4)
        ctx.save_for_backward(decay, masked, x)
        return masked @ x

    @staticmethod
    def backward(ctx, dy):
        decay, masked, x = ctx.saved_tensors
        dy = dy.contiguous()
        dx = masked.transpose(-1, -2) @ dy
        d_masked = dy @ x.transpose(-1, -2)
        d_scores = (d_masked * decay).sum(-4)
        d_exponent = d_masked.mul_(masked)  # zero above the diagonal, where masked is
        da = d_exponent.sum(-1) - d_exponent.sum(-2)
        return da, d_scores, dx


def _factored_chunk(a: torch.Tensor, chunk: int) -> int:
    """The chunk size the factored form can use for log-decays a [b,t,h], or 0 for none."""
    limit = FACTOR_LIMIT.get(a.dtype, 60.0)
    L = chunk
    while min(chunk, MIN_FACTORED_CHUNK) <= L:
        pad = -a.shape[1] % L
        totals = F.pad(a, (0, 0, 0, pad)).unflatten(1, (-1, L)).sum(2)
        if bool(totals.min() >= -limit):
            return L
        L //= 2
    return 0


def _scan_factored(x, dt, a, B, C, init, L):
    """The chunked scan with each decay split as exp(a_l - a_s) = exp(a_l) exp(-a_s).

    Inside a chunk y_l = exp(a_l) [sum_{s<=l} (C_l . B_s) exp(-a_s) dt_s x_s + C_l start]:
    one masked C B^T per group, shared by its heads, and no decay matrix per head at all; all
    big tensors stay in x's own (time-major) layout. Inputs padded to c chunks of L; a = dt A.
    """
    b, T, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    hg, nc = h // g, T // L
    a_cum = a.view(b, nc, L, g, hg).cumsum(2)  # [b,c,l,g,hg]
    grow = dt.view(b, nc, L, g, hg) * (-a_cum).exp()
    u = (x.view(b, nc, L, g, hg, p) * grow[..., None]).permute(0, 3, 1, 2, 4, 5)
    u = u.reshape(b * g * nc, L, hg * p)  # a view when g == 1
    Bc = B.view(b, nc, L, g, n).permute(0, 3, 1, 2, 4).reshape(b * g * nc, L, n)
    Cc = C.view(b, nc, L, g, n).permute(0, 3, 1, 2, 4).reshape(b * g * nc, L, n)
    scores = (Cc @ Bc.transpose(-1, -2)).tril()  # [bgc,l,s], once per group
    # The states are kept transposed, [n, hg*p] per group: the products read them as they are.
    local = (Bc.transpose(-1, -2) @ u).view(b, g, nc, n, hg, p).permute(2, 0, 1, 3, 4, 5)
    log_w = a_cum[:, :, -1].permute(1, 0, 2, 3)[:, :, :, None, :, None]  # [c,b,g,1,hg,1]
    init = init.view(b, g, hg, p, n).permute(0, 1, 4, 2, 3)  # [b,g,n,hg,p]
    starts, final = _ChunkStates.apply(local, log_w, init, True)  # [c,b,g,n,hg,p]
    starts = starts.permute(1, 2, 0, 3, 4, 5).reshape(b * g * nc, n, hg * p)
    z = scores @ u + Cc @ starts  # [bgc,l,hg*p]
    y = z.view(b, g, nc, L, hg, p).permute(0, 2, 3, 1, 4, 5) * a_cum.exp()[..., None]
    return y.reshape(b, T, h, p), final.permute(0, 1, 3, 4, 2)


def _scan_exact(x, dt, a, B, C, init, L):
    """The chunked scan with one decay matrix exp(a_l - a_s) per head and chunk: exact for
    any decay (the mask is applied before the exp). Inputs padded to c chunks of L."""
    b, T, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    hg, nc = h // g, T // L
    a_cum = a.view(b, nc, L, g, hg).cumsum(2)  # [b,c,l,g,hg]
    xdt = (x * dt[..., None]).view(b, nc, L, g, hg, p)
    Bc = B.view(b, nc, L, g, n).permute(0, 3, 1, 2, 4)  # [b,g,c,l,n]
    Cc = C.view(b, nc, L, g, n).permute(0, 3, 1, 2, 4)
    # 1. Inside each chunk, y_l = sum_{s<=l} (C_l . B_s) exp(a_{s+1} + ... + a_l) dt_s x_s.
    scores = Cc @ Bc.transpose(-1, -2)  # [b,g,c,l,s], once per group
    xh = xdt.permute(0, 3, 4, 1, 2, 5).contiguous()  # [b,g,hg,c,l,p]
    y_diag = _ChunkDiagonal.apply(a_cum.permute(0, 3, 4, 1, 2), scores, xh)
    # 2. Each chunk's own contribution to the state at its end: [c, hg*p, l] @ [c, l, n].
    to_end = (a_cum[:, :, -1:] - a_cum).exp()  # [b,c,l,g,hg]
    xs = (xdt * to_end[..., None]).permute(0, 3, 1, 2, 4, 5).reshape(b, g, nc, L, hg * p)
    local = (xs.transpose(-1, -2) @ Bc).view(b, g, nc, hg, p * n).permute(2, 0, 1, 3, 4)
    # 3. States passed across chunks; 4. what each start state adds to its chunk's outputs.
    log_w = a_cum[:, :, -1].permute(1, 0, 2, 3)[..., None]  # [c,b,g,hg,1]
    starts, final = _ChunkStates.apply(local, log_w, init, False)
    starts = starts.view(nc, b, g, hg * p, n).permute(1, 2, 0, 3, 4)  # [b,g,c,hg*p,n]
    y_off = (Cc @ starts.transpose(-1, -2)).view(b, g, nc, L, hg, p).permute(0, 2, 3, 1, 4, 5)
    y = y_off * a_cum.exp()[..., None] + y_diag.permute(0, 3, 4, 1, 2, 5)
    return y.reshape(b, T, h, p), final


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    *,
    form: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan in chunks.

    x [b,t,h,p]; dt [b,t,h] (positive, softplus already applied); A [h] (negative);
    B, C [b,t,g,n]; initial_state [b,h,p,n] or None (zeros).
    Returns y [b,t,h,p] in x's dtype and the final state [b,h,p,n] in fp32 (fp64 if x is
    fp64). Any t works: the last chunk is padded with dt = 0 (no decay, no input), which
    leaves the state alone.

    ``form``: "factored" splits each decay into two exponentials (no per-head decay matrix,
    the fast form) where the decays allow it (see FACTOR_LIMIT), "exact" always builds the
    per-head decay matrices, "auto" (default) takes the factored form where allowed, and the
    exact one under ``torch.compile`` (the check reads the decays on the host).
    """
    b, t, h, p, g, n = _check(x, dt, A, B, C, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if form not in ("auto", "factored", "exact"):
        raise ValueError(f"form must be 'auto', 'factored' or 'exact', got {form!r}")
    out_dtype = x.dtype
    with torch.autocast(device_type=x.device.type, enabled=False):
        work = work_dtype(x)
        x, dt, A, B, C = (v.to(work) for v in (x, dt, A, B, C))
        a = dt * A
        L = min(chunk_size, max(t, 1))
        scan = _scan_exact
        if form != "exact" and not (form == "auto" and torch.compiler.is_compiling()):
            L_factored = _factored_chunk(a, L)
            if L_factored:
                scan, L = _scan_factored, L_factored
        pad = -t % L
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
            dt = F.pad(dt, (0, 0, 0, pad))
            a = F.pad(a, (0, 0, 0, pad))
            B = F.pad(B, (0, 0, 0, 0, 0, pad))
            C = F.pad(C, (0, 0, 0, 0, 0, pad))
        hg = h // g
        if initial_state is None:
            init = x.new_zeros(b, g, hg, p * n)
        else:
            init = initial_state.to(work).reshape(b, g, hg, p * n)
        y, final = scan(x, dt, a, B, C, init, L)
    return y[:, :t].to(out_dtype), final.reshape(b, h, p, n)


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
