"""A (global causal attention) and W (sliding-window attention): GQA, RoPE, SDPA.

Rotary embeddings use the half-split convention of Hugging Face's Llama, so a
plain transformer pattern exports to ``LlamaForCausalLM`` weight for weight.

Two options of pretrained families, off by default (the shape's ``attn_bias`` and ``qk_norm``):
biases on the q, k and v projections (Qwen2; the output projection has none), and an RMSNorm
of every query and key head over its ``head_dim`` channels, one learned scale shared by the
query heads and one by the key heads, applied before RoPE (Qwen3's ``q_norm``/``k_norm``).

W computes only the band a window allows (``banded_window_attention``, in
``window_band.py``): queries in chunks, each chunk against the keys its window reaches, so a
layer costs O(T * window) rather than O(T^2). ``masked_attention``, every query against every
key under a mask, is its readable reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hcomposer.primitives.base import Linear, Primitive, RMSNorm
from hcomposer.primitives.cpu_kernels import attn_step as kernel_attn_step
from hcomposer.primitives.cpu_kernels import block_attn as kernel_block_attn
from hcomposer.primitives.cpu_kernels import enabled as kernels_enabled
from hcomposer.primitives.decoding import fast_decoding
from hcomposer.primitives.window_band import (
    band_chunk,
    banded_keys_per_query,
    banded_window_attention,
    masked_attention,
)
from hcomposer.shapes import Shape

__all__ = [
    "Attention",
    "SlidingWindowAttention",
    "KVCache",
    "RollingKVCache",
    "apply_rope",
    "apply_rope_tables",
    "rope_tables",
    "decode_attention",
    "masked_attention",
    "banded_window_attention",
    "band_chunk",
    "banded_keys_per_query",
]


def _split_heads(total: int, fraction: float, what: str) -> int:
    n = round(total * fraction)
    if n < 1 or abs(n - total * fraction) > 1e-6:
        raise ValueError(f"{what}={total} cannot be split into a {fraction:.3g} share")
    return n


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """theta^(-2i/head_dim) for i < head_dim/2, fp32: the rotation speed of each pair."""
    return 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )


def rope_angles(
    positions: torch.Tensor, head_dim: int, theta: float, inv_freq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, head_dim] for integer positions [T] (computed in fp32)."""
    if inv_freq is None:
        inv_freq = rope_inv_freq(head_dim, theta, positions.device)
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, hd] by the angles [T, hd] (half-split convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float, inv_freq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and a signed sin [T, head_dim] for :func:`apply_rope_tables`: the sin's first half
    negated, so a rotation is two multiplications and one add, with no negated copy of x."""
    cos, sin = rope_angles(positions, head_dim, theta, inv_freq)
    half = head_dim // 2
    return cos, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)


def apply_rope_tables(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor):
    """:func:`apply_rope` from :func:`rope_tables`' tables: x * cos + swap(x) * signed_sin,
    where swap exchanges the two halves of the last dimension (computed in fp32)."""
    xf = x.float()
    return torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, -1), signed_sin).to(x.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for one query per sequence, every key visible.

    q [B, H, 1, hd]; k, v [B, Hkv, L, hd] with H a multiple of Hkv (query head h reads KV head
    h // (H / Hkv), as SDPA's GQA). For one query this is two matrix-vector products per head
    with a softmax between them; SDPA's CPU kernel does it far slower. Both products reduce
    along contiguous memory when k and v are KVCache views (positions contiguous): the form
    PyTorch's CPU kernels run near memory speed in bf16 (about 4x the [L, hd] layout's speed
    for the scores, 25x for the values at 16K). The scale is applied to q and the scores are
    rounded to q's dtype before the fp32 softmax (as an eager bf16 attention does; SDPA keeps
    them in fp32), so bf16 results differ from SDPA's by bf16 rounding; fp32 ones agree.
    """
    B, H, _, hd = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    g = H // Hkv
    q = q * (1.0 / math.sqrt(hd))
    # One mv per query head (a batched matmul takes a slow bf16 path on CPU); for B x H
    # small, as in decoding, the loop costs a few microseconds per head.
    s = torch.stack([torch.mv(k[b, h // g], q[b, h, 0]) for b in range(B) for h in range(H)])
    s = s.view(B, Hkv, g, L)
    work = torch.promote_types(q.dtype, torch.float32)
    p = torch.softmax(s, dim=-1, dtype=work).to(v.dtype)
    # [B, Hkv, hd, g]: v^T times the weights, reducing along positions.
    o = torch.matmul(v.transpose(-1, -2), p.transpose(-1, -2))
    return o.transpose(-1, -2).reshape(B, H, 1, hd)


@dataclass
class KVCache:
    """Global attention cache: keys (already rotated) and values for every position.

    ``k`` and ``v`` are [B, Hkv, max_len, hd] views of storage laid out [B, Hkv, hd, max_len]
    (positions contiguous) when made under ``fast_decoding()``: see ``decode_attention`` for
    why. Any layout gives the same results; the HF wrapper may replace them with plain ones.
    """

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
    window: int | None = None
    # True: the rotation from kept tables (``rope_tables``); False: ``apply_rope``, the
    # plain form it is held to (tests/test_fast_paths.py).
    fast_rope: bool = True

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
        bias = shape.attn_bias
        self.q_proj = Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        if shape.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, shape.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, shape.norm_eps)
        if project:
            self.o_proj = Linear(self.inner_dim, d, bias=False)
            self.o_proj.is_residual_output = True

    @classmethod
    def param_count(cls, shape: Shape, *, fraction: float = 1.0, project: bool = True) -> int:
        """q, k, v projections (grouped KV heads; their biases with ``attn_bias``), the q/k
        norm scales with ``qk_norm``, and the output projection when it has one."""
        nh = _split_heads(shape.n_heads, fraction, "n_heads")
        nkv = _split_heads(shape.n_kv_heads, fraction, "n_kv_heads")
        d, hd = shape.d_model, shape.head_dim
        extra = (hd * (nh + 2 * nkv) if shape.attn_bias else 0) + (2 * hd if shape.qk_norm else 0)
        return d * hd * (nh + 2 * nkv) + (nh * hd * d if project else 0) + extra

    @property
    def qk_norm(self) -> bool:
        return hasattr(self, "q_norm")

    def _norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head RMSNorm of q and k (any layout with ``head_dim`` last), when the shape
        asks for it."""
        if not self.qk_norm:
            return q, k
        return self.q_norm(q), self.k_norm(k)

    def _qkv(self, x: torch.Tensor, start: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self._norm_qk(q, k)
        if not self.fast_rope:
            pos = torch.arange(start, start + T, device=x.device)
            cos, sin = rope_angles(pos, self.head_dim, self.theta, self._inv_freq(x.device))
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
        cos, ssin = self._rope_tables(start, T, x.device)
        return apply_rope_tables(q, cos, ssin), apply_rope_tables(k, cos, ssin), v

    def _rope_tables(self, start: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`rope_tables` for positions start .. start+T-1, kept from the last call: a
        training run asks for the same positions every step (not kept while compiling)."""
        # Tables made under inference mode cannot be saved for a later backward: own key.
        key = (start, T, device, torch.is_inference_mode_enabled())
        kept = getattr(self, "_rope_kept", None)
        if kept is not None and kept[0] == key:
            return kept[1]
        pos = torch.arange(start, start + T, device=device)
        tables = rope_tables(pos, self.head_dim, self.theta, self._inv_freq(device))
        if not torch.compiler.is_compiling():
            self._rope_kept = (key, tables)
        return tables

    def _inv_freq(self, device) -> torch.Tensor:
        # Kept as a plain attribute, not a buffer: it must stay fp32 when the model is cast,
        # and stay out of state dicts and checkpoints.
        inv = getattr(self, "_inv_freq_cache", None)
        if inv is None or inv.device != device:
            inv = rope_inv_freq(self.head_dim, self.theta, device)
            self._inv_freq_cache = inv
        return inv

    def _attend(self, q, k, v, q_pos, k_pos) -> torch.Tensor:
        """SDPA of q [B,H,Tq,hd] over k, v [B,Hkv,Tk,hd] with absolute positions."""
        return masked_attention(q, k, v, q_pos, k_pos, self.window)

    def _empty_kv(self, batch_size: int, slots: int, device, dtype, *, by_position=False):
        """Zeroed key and value buffers [B, Hkv, slots, hd] (a cache's storage).

        With ``by_position`` they are transposed views of [B, Hkv, hd, slots] storage.
        """
        dtype = dtype or self.q_proj.weight.dtype
        B, H, hd = batch_size, self.n_kv_heads, self.head_dim

        def buf():
            if by_position:
                return torch.zeros(B, H, hd, slots, device=device, dtype=dtype).transpose(-1, -2)
            return torch.zeros(B, H, slots, hd, device=device, dtype=dtype)

        return buf(), buf()

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

    def init_cache(self, batch_size, max_len, *, device=None, dtype=None) -> KVCache:
        device = torch.device(device) if device is not None else self.q_proj.weight.device
        # On CPU the fused bf16 kernel reads the ordinary layout (head_dim contiguous) as one
        # stream; PyTorch's own bf16 products want positions contiguous instead. Elsewhere
        # SDPA's kernels want head_dim contiguous.
        dtype = dtype or self.q_proj.weight.dtype
        by_position = fast_decoding() and device.type == "cpu" and not self._kernel_layout(dtype)
        return KVCache(*self._empty_kv(batch_size, max_len, device, dtype, by_position=by_position))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        T = x.shape[1]
        start = 0 if cache is None else cache.pos
        if T == 1 and cache is not None and x.dtype == torch.bfloat16 and fast_decoding():
            y = self._kernel_step(x, cache)
            if y is not None:
                return y
        q, k, v = self._qkv(x, start)
        if cache is None:
            # Every query at its own key: plain causal SDPA, without comparing positions on
            # the host (a sync per layer in eager, a graph break under torch.compile).
            gqa = self.n_kv_heads != self.n_heads
            return self._finish(
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            )
        end = start + T
        if end > cache.k.shape[2]:
            raise ValueError(f"KV cache holds {cache.k.shape[2]} positions; asked for {end}")
        cache.k[:, :, start:end] = k.to(cache.k.dtype)
        cache.v[:, :, start:end] = v.to(cache.v.dtype)
        cache.pos = end
        q_pos = torch.arange(start, end, device=x.device)
        k_all = cache.k[:, :, :end].to(q.dtype)
        v_all = cache.v[:, :, :end].to(q.dtype)
        if T == 1 and fast_decoding() and q.device.type == "cpu":
            # (bf16 caches the C kernel can read were taken by _kernel_step above)
            return self._finish(decode_attention(q, k_all, v_all))
        k_pos = torch.arange(0, end, device=x.device)
        return self._finish(self._attend(q, k_all, v_all, q_pos, k_pos))

    def _kernel_layout(self, dtype) -> bool:
        """The fused kernel's vector path will decode this layer: keep the ordinary layout."""
        return (
            dtype == torch.bfloat16
            and self.head_dim % 8 == 0
            and self.head_dim <= 256
            and self.n_heads // self.n_kv_heads <= 16
            and kernels_enabled()
        )

    def decode_block(self, x: torch.Tensor, norm: torch.nn.Module, cache) -> torch.Tensor | None:
        # The fused block kernel has neither projection biases nor q/k norms.
        if cache is None or not kernels_enabled() or self.shape.attn_bias or self.qk_norm:
            return None
        return kernel_block_attn(x, norm, self, cache, self._inv_freq(x.device))

    def _kernel_step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """The single-token step as one fused CPU kernel (RoPE, cache write, attention), or
        None where it does not apply (then nothing was written)."""
        if (x.device.type != "cpu" or cache.k.dtype != torch.bfloat16 or cache.k.stride(3) != 1
                or cache.pos >= cache.k.shape[2] or not kernels_enabled()):  # fmt: skip
            return None
        B, hd = x.shape[0], self.head_dim
        q = self.q_proj(x).view(B, self.n_heads, 1, hd)
        k = self.k_proj(x).view(B, self.n_kv_heads, 1, hd)
        v = self.v_proj(x).view(B, self.n_kv_heads, 1, hd)
        q, k = self._norm_qk(q, k)  # the kernel applies RoPE, after the norms
        y = kernel_attn_step(q, k, v, cache.k, cache.v, cache.pos, self._inv_freq(x.device))
        if y is None:
            return None
        cache.pos += 1
        return self._finish(y)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.n_kv_heads * self.head_dim * dtype_bytes


class SlidingWindowAttention(_AttentionBase):
    """Causal attention over the last ``shape.window`` tokens (the query's own included).

    Training and prefill compute only the band (``banded_window_attention``, in chunks of
    ``band_chunk``); set ``band_chunk = 0`` for the masked reference path.
    """

    def __init__(self, shape: Shape, *, fraction: float = 1.0, project: bool = True):
        super().__init__(shape, fraction=fraction, project=project)
        self.window = shape.window
        self.band_chunk = band_chunk(shape.window, self.n_heads // self.n_kv_heads)

    def init_cache(self, batch_size, max_len, *, device=None, dtype=None) -> RollingKVCache:
        return RollingKVCache(*self._empty_kv(batch_size, self.window, device, dtype))

    def _window_attend(self, q, k, v) -> torch.Tensor:
        """The queries are the last q.shape[2] of the keys' positions."""
        if self.band_chunk:
            return banded_window_attention(q, k, v, self.window, self.band_chunk)
        k_pos = torch.arange(k.shape[2], device=q.device)
        return self._attend(q, k, v, k_pos[k.shape[2] - q.shape[2] :], k_pos)

    def forward(self, x: torch.Tensor, cache: RollingKVCache | None = None) -> torch.Tensor:
        T = x.shape[1]
        start = 0 if cache is None else cache.pos
        q, k, v = self._qkv(x, start)
        if cache is None:
            return self._finish(self._window_attend(q, k, v))
        w = self.window
        # Earlier keys still inside the first new query's window, in time order.
        prev = torch.arange(max(0, start - w + 1), start, device=x.device)
        slots = prev % w
        k_all = torch.cat([cache.k[:, :, slots].to(k.dtype), k], dim=2)
        v_all = torch.cat([cache.v[:, :, slots].to(v.dtype), v], dim=2)
        y = self._window_attend(q, k_all, v_all)
        keep = torch.arange(start, start + T, device=x.device)[-min(T, w) :]
        cache.k[:, :, keep % w] = k[:, :, -len(keep) :].to(cache.k.dtype)
        cache.v[:, :, keep % w] = v[:, :, -len(keep) :].to(cache.v.dtype)
        cache.pos = start + T
        return self._finish(y)

    def state_bytes(self, dtype_bytes: int = 2) -> int:
        return 2 * self.n_kv_heads * self.head_dim * self.window * dtype_bytes
