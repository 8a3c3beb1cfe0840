"""The gated delta rule (Yang, Kautz & Hatamizadeh, arXiv 2412.06464): chunked and step forms.

Per head, with the state stored as S [d_k, d_v] (the transpose of the paper's S_t, so that a
read is the row-vector product q^T S), decay alpha_t = exp(g_t) in (0, 1] and write strength
beta_t in (0, 1):

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale * q_t)                                 scale = 1 / sqrt(d_k) by default

Equivalently S_t = alpha_t S_{t-1} + k_t u_t^T with the "delta" u_t = beta_t (v_t - alpha_t
S_{t-1}^T k_t): the state moves its prediction for key k_t towards v_t by a fraction beta_t.

``gated_delta_rule_chunked`` computes the same thing in chunks of L steps (the WY / UT form).
Inside a chunk, with gamma_i = g_1 + ... + g_i (prefix sums of the log-decays) and the state H
at the chunk start, the deltas solve a unit lower-triangular system:

    (I + A) U = diag(beta) V - diag(beta exp(gamma)) K H,    A[i, j] = beta_i exp(gamma_i -
                                                             gamma_j) k_i . k_j   (j < i)
so U = U0 - W H with U0 = T diag(beta) V, W = T diag(beta exp(gamma)) K, T = (I + A)^-1. Then

    O     = (diag(exp(gamma)) Q - P W) H + P U0,   P[i, j] = exp(gamma_i - gamma_j) q_i . k_j
                                                              (j <= i)
    H_end = (exp(gamma_L) I - Kd^T W) H + Kd^T U0,  Kd = diag(exp(gamma_L - gamma)) K

Everything except the last line is independent of H and is computed for all chunks at once
(batched matrix products and one batched triangular solve); the chunks are then linked by one
[d_k, d_k] @ [d_k, d_v] product per chunk, the only sequential part, and the outputs take the
chunk start states in one more batched product. ``gated_delta_rule_reference`` is the plain
loop over time, kept readable on purpose: the tests hold the chunked form to it (outputs,
final states and gradients, in fp64).

Numerics. All arithmetic runs in fp32 even under bf16 autocast (fp64 stays fp64): the decays
are exponentials of sums of up to L log-decays, and the triangular solve accumulates L terms
per entry; bf16's 8-bit mantissa would turn both into noise. Every exponent used is a
difference gamma_i - gamma_j with j <= i, or gamma_i itself, so it is <= 0 and exp() never
overflows (a form that divides by exp(gamma_j) would overflow for strong decays). The mask is
applied before exp(), never after, so masked entries are exp(-inf) = 0 with zero gradient. The
system (I + A) is unit lower-triangular; its inverse is the WY form of the chunk's product of
the factors I - beta k k^T, which are contractions for unit-norm keys and beta in (0, 1), so it
stays bounded in practice (the fp32 tests over 300 steps and with strong decays hold to 1e-4).
It is solved with a triangular solve (backward stable), never inverted explicitly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hcomposer.primitives.ssd import work_dtype

__all__ = [
    "gated_delta_rule_chunked",
    "gated_delta_rule_reference",
    "gated_delta_rule_step",
    "chunked_flops",
]


def _check(q, k, v, g, beta, initial_state) -> tuple[int, int, int, int, int]:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4:
        raise ValueError(
            "gated delta rule expects q and k [b,t,h,d_k], v [b,t,h,d_v]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if v.shape[:3] != (b, t, h) or g.shape != (b, t, h) or beta.shape != (b, t, h):
        raise ValueError(
            "gated delta rule: v [b,t,h,d_v], g and beta [b,t,h] must match q in batch, time "
            f"and heads; got v {tuple(v.shape)}, g {tuple(g.shape)}, beta {tuple(beta.shape)}"
        )
    if initial_state is not None and initial_state.shape != (b, h, dk, dv):
        raise ValueError(
            f"gated delta rule: initial_state must be {(b, h, dk, dv)}, "
            f"got {tuple(initial_state.shape)}"
        )
    return b, t, h, dk, dv


def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule in chunks (WY representation); see the module docstring.

    q, k [b,t,h,d_k] (k normally L2-normalised); v [b,t,h,d_v]; g [b,t,h] log-decays (<= 0);
    beta [b,t,h] write strengths; initial_state [b,h,d_k,d_v] or None (zeros); scale multiplies
    q (default d_k ** -0.5). Returns o [b,t,h,d_v] in v's dtype and the final state
    [b,h,d_k,d_v] in fp32 (fp64 for fp64 inputs). Any t works: the last chunk is padded with
    g = 0, beta = 0 and zero q, k, v, steps that leave the state unchanged.
    """
    b, t, h, dk, dv = _check(q, k, v, g, beta, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    scale = dk**-0.5 if scale is None else scale
    out_dtype = v.dtype
    work = work_dtype(v)
    with torch.autocast(device_type=q.device.type, enabled=False):
        L = min(chunk_size, max(t, 1))
        nc = -(-t // L)
        pad = nc * L - t
        # [b,h,t,...]: heads next to batch, so that every product below is batched over (b, h).
        q, k, v = (x.to(work).transpose(1, 2) for x in (q, k, v))
        g, beta = (x.to(work).transpose(1, 2) for x in (g, beta))
        if pad:
            q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
            g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
        q = (q * scale).view(b, h, nc, L, dk)
        k = k.view(b, h, nc, L, dk)
        v = v.view(b, h, nc, L, dv)
        beta = beta.view(b, h, nc, L)
        gamma = g.view(b, h, nc, L).cumsum(-1)  # within-chunk prefix sums: small, accurate

        # Pairwise decays exp(gamma_i - gamma_j) for j <= i, masked before exp (see above).
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf"))
        decay = decay.exp()  # [b,h,c,L,L], lower triangle incl. diagonal

        # 1. The WY factors: one triangular solve for U0 and W together (right-hand sides
        # concatenated). A is strictly lower: its diagonal would be beta_i k_i.k_i, which the
        # unit diagonal of the solve replaces (the delta of step i does not read itself).
        strict = torch.ones(L, L, dtype=torch.bool, device=q.device).tril(-1)
        A = ((k @ k.transpose(-1, -2)) * decay * beta[..., None]).masked_fill(~strict, 0.0)
        eye = torch.eye(L, dtype=work, device=q.device)
        rhs = torch.cat([v * beta[..., None], k * (beta * gamma.exp())[..., None]], dim=-1)
        sol = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
        U0, W = sol.split([dv, dk], dim=-1)  # [b,h,c,L,dv], [b,h,c,L,dk]

        # 2. What does not depend on the chunk's start state, for all chunks at once.
        P = (q @ k.transpose(-1, -2)) * decay  # [b,h,c,L,L], zero above the diagonal
        q_eff = q * gamma.exp()[..., None] - P @ W  # reads the start state: [b,h,c,L,dk]
        o_local = P @ U0  # the chunk's own writes: [b,h,c,L,dv]
        kd = k * (gamma[..., -1:] - gamma).exp()[..., None]  # decayed to the chunk end
        kdT = kd.transpose(-1, -2)
        carry = gamma[..., -1].exp()[..., None, None] * torch.eye(dk, dtype=work, device=q.device)
        M = carry - kdT @ W  # [b,h,c,dk,dk]: how the start state reaches the end state
        N = kdT @ U0  # [b,h,c,dk,dv]: what the chunk writes into the end state

        # 3. Link the chunks: H_{c+1} = M_c H_c + N_c, the one sequential loop.
        if initial_state is None:
            H = q.new_zeros(b, h, dk, dv)
        else:
            H = initial_state.to(work)
        starts = []
        for c in range(nc):
            starts.append(H)
            H = M[:, :, c] @ H + N[:, :, c]
        S = torch.stack(starts, dim=2)  # [b,h,c,dk,dv]

        # 4. Outputs: the start state read through q_eff, plus the chunk's own writes.
        o = q_eff @ S + o_local
        o = o.reshape(b, h, nc * L, dv)[:, :, :t].transpose(1, 2)
    return o.to(out_dtype), H


def chunked_flops(t: int, h: int, dk: int, dv: int, chunk_size: int) -> float:
    """Matrix-product FLOPs of ``gated_delta_rule_chunked`` for one sequence of t steps.

    Per chunk of L = min(chunk_size, t) steps and per head: K K^T and Q K^T (2 L^2 d_k each),
    the unit triangular solve with d_v + d_k right-hand sides (L (L - 1) per column), P W
    (2 L^2 d_k), P U0 (2 L^2 d_v), Kd^T W (2 L d_k^2), Kd^T U0 (2 L d_k d_v), the chunk link
    M H (2 d_k^2 d_v) and q_eff S (2 L d_k d_v). The padding of the last chunk is counted (it
    is computed). Elementwise work (decays, masks, the eye) is left out.
    """
    if t <= 0:
        return 0.0
    L = min(chunk_size, t)
    nc = -(-t // L)
    per_chunk = (
        6 * L * L * dk
        + L * (L - 1) * (dk + dv)
        + 2 * L * L * dv
        + 2 * L * dk * dk
        + 4 * L * dk * dv
        + 2 * dk * dk * dv
    )
    return float(nc * h * per_chunk)


def gated_delta_rule_step(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: state [b,h,d_k,d_v], q and k [b,h,d_k], v [b,h,d_v], g and beta [b,h].

    Returns (o [b,h,d_v], new state), both in fp32 (fp64 for fp64 inputs).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    work = work_dtype(v)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v, g, beta, state = (x.to(work) for x in (q, k, v, g, beta, state))
        decayed = state * g.exp()[..., None, None]
        # What the decayed state predicts for k, and the delta that corrects it.
        pred = (k[..., None, :] @ decayed).squeeze(-2)  # [b,h,d_v]
        u = beta[..., None] * (v - pred)
        new = decayed + k[..., :, None] * u[..., None, :]
        o = ((q * scale)[..., None, :] @ new).squeeze(-2)
    return o, new


def gated_delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one step at a time (slow, readable): the reference for the chunked form.

    Same arguments and results as ``gated_delta_rule_chunked`` (without the chunk size). It
    applies the paper's update literally, with the [d_k, d_k] matrix I - beta k k^T, rather
    than the delta form of ``gated_delta_rule_step``: an independent check of both.
    """
    out_dtype = v.dtype
    b, t, h, dk, dv = _check(q, k, v, g, beta, initial_state)
    scale = dk**-0.5 if scale is None else scale
    work = work_dtype(v)
    q, k, v, g, beta = (x.to(work) for x in (q, k, v, g, beta))
    if initial_state is None:
        state = v.new_zeros(b, h, dk, dv)
    else:
        state = initial_state.to(work)
    eye = torch.eye(dk, dtype=work, device=v.device)
    outs = []
    for i in range(t):
        # The paper's update as written (transposed): a rank-one "erase" of what the state
        # holds for k_t, a decay, then a rank-one write of v_t under k_t.
        qi, ki, vi = q[:, i], k[:, i], v[:, i]  # [b,h,d]
        a, bt = g[:, i].exp()[..., None, None], beta[:, i][..., None, None]
        erase = eye - bt * (ki[..., :, None] * ki[..., None, :])  # [b,h,dk,dk]
        state = a * (erase @ state) + bt * (ki[..., :, None] * vi[..., None, :])
        outs.append(((scale * qi)[..., None, :] @ state).squeeze(-2))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(b, 0, h, dv)
    return o.to(out_dtype), state
