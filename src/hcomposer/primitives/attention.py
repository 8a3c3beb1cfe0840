"""A (global causal attention) and W (sliding-window attention): GQA, RoPE, SDPA.

Rotary embeddings use the half-split convention of Hugging Face's Llama, so a
plain transformer pattern exports to ``LlamaForCausalLM`` weight for weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hcomposer.primitives.base import Primitive
from hcomposer.shapes import Shape

__all__ = ["Attention", "SlidingWindowAttention", "KVCache", "RollingKVCache", "apply_rope"]


def _split_heads(total: int, fraction: float, what: str) -> int:
    n = round(total * fraction)
    if n < 1 or abs(n - total * fraction) > 1e-6:
        raise ValueError(f"{what}={total} cannot be split into a {fraction:.3g} share")
    return n


def rope_angles(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, head_dim] for integer positions [T] (computed in fp32)."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, hd] by the angles [T, hd] (half-split convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


@dataclass
class KVCache:
    """Global attention cache: keys (already rotated) and values for every position."""

    k: torch.Tensor  # [B, Hkv, max_len, hd]
    v: torch.Tensor
    pos: int = 0


@dataclass
class RollingKVCache:
    """Sliding-window cache: a ring buffer of ``window`` slots; memory never grows."""

    k: torch.Tensor  # [B, Hkv, window, hd]; slot of absolute position p is p % window
    v: torch.Tensor
    pos: int = 0


class _AttentionBase(Primitive):
    is_mixer = True
    window: int | None = None

    def __init__(self, shape: Shape, *, fraction: float = 1.0, project: bool = True):
        super().__init__(shape, fraction=fraction, project=project)
        self.n_heads = _split_heads(shape.n_heads, fraction, "n_heads")
        self.n_kv_heads = _split_heads(shape.n_kv_heads, fraction, "n_kv_heads")
        if self.n_heads % self.n_kv_heads:
            raise ValueError("kv heads must divide query heads in every branch")
        self.head_dim = shape.head_dim
        self.theta = shape.rope_theta
        d = shape.d_model
        self.inner_dim = self.n_heads * self.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        if project:
            self.o_proj = nn.Linear(self.inner_dim, d, bias=False)
            self.o_proj.is_residual_output = True

    def _qkv(self, x: torch.Tensor, start: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        pos = torch.arange(start, start + T, device=x.device)
        cos, sin = rope_angles(pos, self.head_dim, self.theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _attend(self, q, k, v, q_pos, k_pos) -> torch.Tensor:
        """SDPA of q [B,H,Tq,hd] over k, v [B,Hkv,Tk,hd] with absolute positions."""
        Tq, Tk = q.shape[2], k.shape[2]
        # SDPA reads each KV head for its group of query heads itself: no repeated copy of
        # K and V (1.4-1.5x faster forward+backward on CPU than repeat_interleave).
        gqa = self.n_kv_heads != self.n_heads
        full_causal = Tq == Tk and bool((q_pos == k_pos).all()) and self.window is None
        if full_causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        mask = k_pos[None, :] <= q_pos[:, None]
        if self.window is not None:
            mask = mask & (k_pos[None, :] > q_pos[:, None] - self.window)
        if Tq == 1 and bool(mask.all()):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def _empty_kv(self, batch_size: int, slots: int, device, dtype):
        """Zeroed key and value buffers [B, Hkv, slots, hd] (a cache's storage)."""
        shape = (batch_size, self.n_kv_heads, slots, self.head_dim)
        dtype = dtype or self.q_proj.weight.dtype
        return (
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
        )

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).reshape(B, T, self.inner_dim)
        return self.o_proj(y) if self.project else y

    def extra_flops_per_token(self, seq_len: int) -> float:
        # QK^T and AV: 2 matmuls x 2 FLOPs x heads x head_dim x (keys seen), averaged
        # over the causal triangle (or the window band).
        w = self.window or seq_len
        visible = sum(min(i + 1, w) for i in range(seq_len)) / seq_len if seq_len else 0
        return 4.0 * self.n_heads * self.head_dim * visible


class Attention(_AttentionBase):
    """Global causal attention with grouped-query heads and a growing KV cache."""

    token = "A"

    def init_cache(self, batch_size, max_len, *, device=None, dtype=None) -> KVCache:
        return KVCache(*self._empty_kv(batch_size, max_len, device, dtype))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        T = x.shape[1]
        start = 0 if cache is None else cache.pos
        q, k, v = self._qkv(x, start)
        q_pos = torch.arange(start, start + T, device=x.device)
        if cache is None:
            return self._finish(self._attend(q, k, v, q_pos, q_pos))
        end = start + T
        if end > cache.k.shape[2]:
            raise ValueError(f"KV cache holds {cache.k.shape[2]} positions; asked for {end}")
        cache.k[:, :, start:end] = k.to(cache.k.dtype)
        cache.v[:, :, start:end] = v.to(cache.v.dtype)
        cache.pos = end
        k_all = cache.k[:, :, :end].to(q.dtype)
        v_all = cache.v[:, :, :end].to(q.dtype)
        k_pos = torch.arange(0, end, device=x.device)
        return self._finish(self._attend(q, k_all, v_all, q_pos, k_pos))

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.n_kv_heads * self.head_dim * dtype_bytes


class SlidingWindowAttention(_AttentionBase):
    """Causal attention over the last ``shape.window`` tokens (the query's own included)."""

    token = "W"

    def __init__(self, shape: Shape, *, fraction: float = 1.0, project: bool = True):
        super().__init__(shape, fraction=fraction, project=project)
        self.window = shape.window

    def init_cache(self, batch_size, max_len, *, device=None, dtype=None) -> RollingKVCache:
        return RollingKVCache(*self._empty_kv(batch_size, self.window, device, dtype))

    def forward(self, x: torch.Tensor, cache: RollingKVCache | None = None) -> torch.Tensor:
        T = x.shape[1]
        start = 0 if cache is None else cache.pos
        q, k, v = self._qkv(x, start)
        q_pos = torch.arange(start, start + T, device=x.device)
        if cache is None:
            return self._finish(self._attend(q, k, v, q_pos, q_pos))
        w = self.window
        # Earlier keys still inside the first new query's window, in time order.
        prev = torch.arange(max(0, start - w + 1), start, device=x.device)
        slots = prev % w
        k_all = torch.cat([cache.k[:, :, slots].to(k.dtype), k], dim=2)
        v_all = torch.cat([cache.v[:, :, slots].to(v.dtype), v], dim=2)
        k_pos = torch.cat([prev, q_pos])
        y = self._attend(q, k_all, v_all, q_pos, k_pos)
        keep = q_pos[-min(T, w) :]
        cache.k[:, :, keep % w] = k[:, :, -len(keep) :].to(cache.k.dtype)
        cache.v[:, :, keep % w] = v[:, :, -len(keep) :].to(cache.v.dtype)
        cache.pos = start + T
        return self._finish(y)

    def state_bytes(self, dtype_bytes: int = 2) -> int:
        return 2 * self.n_kv_heads * self.head_dim * self.window * dtype_bytes
