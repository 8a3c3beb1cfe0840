"""Sliding-window attention computing only its band, and the masked form it is held to.

``masked_attention`` computes every query against every key and drops the scores outside the
window with a mask: the readable reference. ``banded_window_attention`` computes the band:
queries in chunks of ``chunk``, each chunk against the ``chunk + window - 1`` keys its window
reaches (from 512 up, rounded up to a multiple of 64), one small mask shared by every chunk,
so a layer costs O(T * window) rather than O(T^2). On CPU the chunks go straight to PyTorch's
flash-attention kernels in one custom autograd step (forward and backward), which spares
autograd's generic gradient of the overlapping key blocks, with the query heads that share a
KV head stacked into one call; elsewhere, and under ``torch.compile``, the same chunks go
through ``scaled_dot_product_attention``. (``torch.nn.attention.flex_attention`` has no
backward on CPU in torch 2.13, and its compiled forward was slower than these chunks.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_attention", "banded_window_attention", "band_chunk", "banded_keys_per_query"]

# PyTorch's own CPU flash kernels (private ops: a torch without them takes the SDPA path).
_CPU_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_BACKWARD = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None
)


def masked_attention(q, k, v, q_pos, k_pos, window: int | None = None) -> torch.Tensor:
    """SDPA of q [B,H,Tq,hd] over k, v [B,Hkv,Tk,hd]: causal by absolute positions, and
    limited to the last ``window`` keys when one is given. Every score is computed and the
    mask drops the ones outside: the plain form the banded path is held to."""
    Tq, Tk = q.shape[2], k.shape[2]
    # SDPA reads each KV head for its group of query heads itself: no repeated copy of
    # K and V (1.4-1.5x faster forward+backward on CPU than repeat_interleave).
    gqa = k.shape[1] != q.shape[1]
    if window is None and Tq == Tk and bool((q_pos == k_pos).all()):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask = mask & (k_pos[None, :] > q_pos[:, None] - window)
    if Tq == 1 and bool(mask.all()):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def band_chunk(window: int, group: int = 1) -> int:
    """Queries per chunk of the banded path for a window and ``group`` query heads per KV
    head: half the window at most, at least 16, and at most 192, or ``max(64, 256 // group)``
    when heads are grouped.

    A chunk of c queries reads c + window - 1 keys, so it computes (c + window - 1) / window
    times the band's scores; smaller chunks waste fewer scores but run smaller products.
    PyTorch's CPU flash kernel (by its source) splits the queries of a call into blocks of
    64 rows from 192 queries up and of 32 below, and runs the small blocks slower per score.
    On CPU the query heads of a group share one call (their rows stacked against the same
    keys), so a call has group * c rows: with 2 heads a group, chunks of 128 make 256 rows on
    the faster blocks at 1.25x the band's scores, where ungrouped heads need chunks of 192
    (1.37x). Measured at window 512, T 8192 on the 2-core CPU, 4 query and 2 KV heads
    (benchmarks/results/window/README.md); other group sizes follow the same rule unmeasured.
    """
    cap = 192 if group == 1 else max(64, 256 // group)
    return max(16, min(cap, window // 2))


def banded_keys_per_query(n_queries: int, n_past: int, window: int, chunk: int) -> float:
    """Scores per query that ``banded_window_attention`` computes (padding included): what
    its FLOPs are, against the band's ``min(i + 1, window)``."""
    if n_queries == 0:
        return 0.0
    if _short(n_queries, n_past, window, chunk):
        return float(n_past + n_queries - max(0, n_past - (window - 1)))
    n = -(-n_queries // chunk)
    return n * chunk * _key_block(chunk, window) / n_queries


def _key_block(c: int, window: int) -> int:
    """Keys per chunk: the c + window - 1 its window reaches, from 512 up (one full key block
    of the CPU kernel) rounded up to a multiple of 64 with masked padding, so the kernel's
    last key block is whole 64-wide columns (chunks of 128 at window 512: 640 keys ran
    0.87-0.90x the time of 639 in the attention alone). Fewer keys are left as they are, as
    rounding would add a large share of them."""
    K = c + window - 1
    return K if K < 512 else -(-K // 64) * 64


def _short(n_queries: int, n_past: int, window: int, chunk: int) -> bool:
    """Inputs the masked path takes: fewer queries than a chunk, or every key in reach."""
    return n_queries < chunk or n_past + n_queries <= window


def banded_window_attention(q, k, v, window: int, chunk: int) -> torch.Tensor:
    """Sliding-window causal attention computing only the band, equal to ``masked_attention``.

    q [B,H,T,hd]; k, v [B,Hkv,P+T,hd], where query i sits at key P+i (P earlier keys from a
    cache, 0 in training). The queries are padded at the end to whole chunks; the keys are cut
    to those the first query reaches and padded to ``window - 1`` before it and to the padded
    queries' end. Chunk j then reads padded keys j*c .. j*c+K-1 (K = c + window - 1, from
    512 up rounded up to a multiple of 64 with masked padding after the last key), and inside
    that [c, K] block query r sees keys r .. r+window-1: one mask shared by every chunk, with
    the padding before the first key masked in the first chunks. The key blocks overlap and
    are views (``unfold``), not copies. Short inputs go through ``masked_attention``.
    """
    T, Tk = q.shape[2], k.shape[2]
    P = Tk - T
    first = max(0, P - (window - 1))  # the first key any query reaches
    if _short(T, P, window, chunk):
        pos = torch.arange(first, Tk, device=q.device)
        return masked_attention(q, k[:, :, first:], v[:, :, first:], pos[P - first :], pos, window)
    n = -(-T // chunk)
    front = (window - 1) - (P - first)  # padded keys before the first real one
    back = n * chunk - T
    extra = _key_block(chunk, window) - (chunk + window - 1)
    qp = F.pad(q, (0, 0, 0, back))
    kp = F.pad(k[:, :, first:], (0, 0, front, back + extra))
    vp = F.pad(v[:, :, first:], (0, 0, front, back + extra))
    masks = _band_masks(n, chunk, window, front, q.dtype, q.device)
    if _cpu_kernels(q):
        y = _cpu_band(qp, kp, vp, chunk, masks)
    else:
        y = _sdpa_band(qp, kp, vp, chunk, masks)
    return y[:, :, :T]


def _cpu_kernels(q: torch.Tensor) -> bool:
    """Whether the chunks go straight to the CPU flash kernels (else through SDPA)."""
    return (
        _CPU_BACKWARD is not None and q.device.type == "cpu" and not torch.compiler.is_compiling()
    )


def _band_masks(n: int, c: int, window: int, front: int, dtype, device):
    """Additive masks (0 kept, -inf dropped): [c, K] shared by chunks n0 .. n-1, and
    [n0, 1, c, K] for the first n0 chunks, which also drop the ``front`` padded keys."""
    K = _key_block(c, window)
    r = torch.arange(c, device=device)[:, None]
    s = torch.arange(K, device=device)[None, :]
    keep = (s >= r) & (s < r + window)
    n0 = min(n, -(-front // c))
    j = torch.arange(n0, device=device)[:, None, None, None]
    keep0 = keep & (j * c + s >= front)

    def additive(m):
        return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(~m, float("-inf"))

    return additive(keep), additive(keep0)


def _cpu_band(qp, kp, vp, c: int, masks):
    """The chunks through the CPU flash kernels, the query heads of each KV head's group
    folded into one call: chunk j of heads g*h .. g*h+g-1 becomes rows [g*c] of KV head h
    (a copy of q; the mask repeated per head), so the kernel runs g times the rows at once."""
    B, H, Tp, hd = qp.shape
    Hkv = kp.shape[1]
    g, n = H // Hkv, Tp // c
    if g == 1:
        return _CpuBand.apply(qp, kp, vp, c, c, *masks)
    mask, mask0 = masks
    qf = qp.view(B, Hkv, g, n, c, hd).transpose(2, 3).reshape(B, Hkv, n * g * c, hd)
    y = _CpuBand.apply(qf, kp, vp, c, g * c, mask.repeat(g, 1), mask0.repeat(1, 1, g, 1))
    return y.view(B, Hkv, n, g, c, hd).transpose(2, 3).reshape(B, H, Tp, hd)


def _blocks(qp, kp, vp, b: int, rows: int, c: int, K: int):
    """Sequence b in chunks: q [n, H, rows, hd] and the overlapping k, v [n, Hkv, K, hd]
    (views), key block j starting at j * c."""
    qb = qp[b].unflatten(1, (-1, rows)).transpose(0, 1)
    kb = kp[b].unfold(1, K, c).permute(1, 0, 3, 2)
    vb = vp[b].unfold(1, K, c).permute(1, 0, 3, 2)
    return qb, kb, vb


def _groups(n: int, mask, mask0):
    """(chunk slice, mask) pairs: the first chunks with their own masks, the rest shared."""
    n0 = mask0.shape[0]
    out = [(slice(0, n0), mask0)] if n0 else []
    return out + ([(slice(n0, n), mask)] if n0 < n else [])


def _sdpa_band(qp, kp, vp, c: int, masks):
    mask, mask0 = masks
    K = mask.shape[1]
    gqa = kp.shape[1] != qp.shape[1]
    rows = []
    for b in range(qp.shape[0]):
        qb, kb, vb = _blocks(qp, kp, vp, b, c, c, K)
        parts = [
            F.scaled_dot_product_attention(qb[j], kb[j], vb[j], attn_mask=m, enable_gqa=gqa)
            for j, m in _groups(qb.shape[0], mask, mask0)
        ]
        rows.append(torch.cat(parts).transpose(0, 1).flatten(1, 2))
    return torch.stack(rows)


class _CpuBand(torch.autograd.Function):
    """The chunks through the CPU flash kernels: forward, and a backward that puts each
    chunk's key and value gradients into place with one strided copy or add per c columns of
    the key blocks (autograd's generic gradient of ``unfold`` was 5% of the step). A chunk
    has ``rows`` query rows (c, or c per head of a folded group) and key block j starts at
    j * c."""

    @staticmethod
    def forward(ctx, qp, kp, vp, c: int, rows: int, mask, mask0):
        K = mask.shape[1]
        out = torch.empty_like(qp)
        lse = []
        for b in range(qp.shape[0]):
            qb, kb, vb = _blocks(qp, kp, vp, b, rows, c, K)
            ob = out[b].unflatten(1, (-1, rows)).transpose(0, 1)
            for j, m in _groups(qb.shape[0], mask, mask0):
                o, s = _CPU_FORWARD(qb[j], kb[j], vb[j], 0.0, False, attn_mask=m)
                ob[j] = o
                lse.append(s)
        ctx.save_for_backward(qp, kp, vp, out, mask, mask0, *lse)
        ctx.c, ctx.rows = c, rows
        return out

    @staticmethod
    def backward(ctx, grad):
        qp, kp, vp, out, mask, mask0, *lse = ctx.saved_tensors
        c, rows, K = ctx.c, ctx.rows, mask.shape[1]
        grad = grad.to(out.dtype)
        dq = torch.empty_like(qp)
        # Room for every chunk's full key block, so each strided add is a plain view; the
        # first c columns of the blocks tile [0, n*c) exactly, so they are written, not added.
        n, Lk = qp.shape[2] // rows, kp.shape[2]
        wide = (n + -(-K // c)) * c
        dk = kp.new_empty(kp.shape[0], kp.shape[1], wide, kp.shape[3])
        dv = torch.empty_like(dk)
        dk[:, :, n * c :] = 0
        dv[:, :, n * c :] = 0
        blocks, it = [], iter(lse)
        for b in range(qp.shape[0]):
            qb, kb, vb = _blocks(qp, kp, vp, b, rows, c, K)
            ob, gb, dqb = (t[b].unflatten(1, (-1, rows)).transpose(0, 1) for t in (out, grad, dq))
            for j, m in _groups(n, mask, mask0):
                gq, gk, gv = _CPU_BACKWARD(
                    gb[j], qb[j], kb[j], vb[j], ob[j], next(it), 0.0, False, attn_mask=m
                )
                dqb[j] = gq
                for acc, g in ((dk[b], gk), (dv[b], gv)):
                    _column(acc, j.start, g.shape[0], c, 0).copy_(g[:, :, :c].transpose(0, 1))
                    blocks.append((acc, g, j.start))
        for acc, g, j0 in blocks:
            for lo in range(c, K, c):
                width = min(K, lo + c) - lo
                _column(acc, j0, g.shape[0], c, lo)[:, :, :width] += g[
                    :, :, lo : lo + width
                ].transpose(0, 1)
        return dq, dk[:, :, :Lk], dv[:, :, :Lk], None, None, None, None


def _column(acc, j0: int, m: int, c: int, lo: int):
    """acc [Hkv, L, hd] as [Hkv, m, c, hd]: column lo .. lo+c-1 of the key blocks of chunks
    j0 .. j0+m-1, block j starting at j*c (a view)."""
    start = j0 * c + lo
    return acc[:, start : start + m * c].unflatten(1, (m, c))
