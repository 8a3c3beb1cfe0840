"""D: the Gated DeltaNet mixer (Yang, Kautz & Hatamizadeh, arXiv 2412.06464); scan in delta_rule.py.

Layout, per token (d = d_model; Hk q/k heads of K = dn_head_dim; Hv value heads of
V = dn_v_head_dim, Hv a multiple of Hk):

    in_proj: d -> [q (Hk K), k (Hk K), v (Hv V), gate (Hv V), a (Hv), b (Hv)]   no bias
    q, k, v = silu(causal depthwise conv1d over [q, k, v])    kernel dn_conv, no bias
    q, k    = q / |q|, k / |k|      per head (L2, in fp32)
    g       = -softplus(a + dt_bias) * exp(A_log)             log of the decay alpha, per head
    beta    = sigmoid(b)                                      write strength, per head
    o       = gated delta rule(q, k, v, g, beta)              q scaled by 1/sqrt(K) inside
    o       = RMSNorm(o) * silu(gate)     per head over V, one learned scale of V shared by heads
    out     = out_proj(o)                 Hv V -> d (absent in a group branch)

With Hv > Hk each q/k head serves Hv/Hk consecutive value heads (Qwen3-Next's layout).

As a branch of ``[A|D]`` it takes ``fraction`` of the heads (q/k and value), has no out_proj
and returns the gated, normed ``o``: like S, its output already went through its own norm, so
the group adds no second one.

Decoding: the cache holds the last ``dn_conv - 1`` conv inputs and the state [B, Hv, K, V]
(fp32). One new token takes the recurrent step; several (prefill, chunked prefill) run the conv
over [cached inputs, new] and the chunked scan from the cached state, so any split of a
sequence gives the full forward's outputs.

Initialisation: A_log = log(U[1, 16]) (Mamba-2's default range; the paper's code draws from
(0, 16)), dt_bias = softplus^-1(dt) with dt log-uniform in Mamba-2's [1e-3, 1e-1], norm scale
1; in_proj/out_proj follow the model's normal init, the conv keeps PyTorch's default.

Fast path: on CUDA the chunked scan is flash-linear-attention's kernel when it is installed
(the ``cuda`` extra; see fla_delta.py, HCOMPOSER_DELTA=torch turns it off); CPU inputs always
use ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hcomposer.errors import ShapeError
from hcomposer.primitives.base import Linear, Primitive
from hcomposer.primitives.delta_rule import (
    chunked_flops,
    gated_delta_rule_chunked,
    gated_delta_rule_step,
)
from hcomposer.primitives.fla_delta import fla_gated_delta_rule, use_fast_delta
from hcomposer.primitives.mamba2 import init_decay_and_step, zero_states
from hcomposer.primitives.short_conv import causal_conv_silu
from hcomposer.shapes import Shape

__all__ = ["GatedDeltaNet", "DeltaNetCache", "A_INIT_RANGE", "L2_EPS"]

A_INIT_RANGE = (1.0, 16.0)
# Added to |x|^2 before the inverse square root, as the paper's reference code does: a smooth
# normalisation whose gradient stays finite at x = 0.
L2_EPS = 1e-6


@dataclass
class DeltaNetCache:
    """Decoding state of one D layer: constant size, whatever the context length."""

    conv_state: torch.Tensor  # [B, conv_channels, dn_conv - 1]: the last conv inputs
    state: torch.Tensor  # [B, Hv, K, V], fp32 (fp64 for an fp64 model)
    pos: int = 0


def _split(total: int, fraction: float, field: str, shape: Shape) -> int:
    n = round(total * fraction)
    if n < 1 or abs(n - total * fraction) > 1e-6:
        raise ShapeError(
            f"shape {shape.name!r}: {field}={total} cannot be split into a {fraction:.3g} share "
            "for a parallel group",
            field=field,
        )
    return n


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2_EPS)


class GatedDeltaNet(Primitive):
    """The D primitive; see the module docstring."""

    normalized_output = True

    def __init__(self, shape: Shape, *, fraction: float = 1.0, project: bool = True):
        super().__init__(shape, fraction=fraction, project=project)
        self.n_heads = _split(shape.dn_heads, fraction, "dn_heads", shape)
        self.n_v_heads = _split(shape.dn_v_heads, fraction, "dn_v_heads", shape)
        if self.n_v_heads % self.n_heads:
            raise ShapeError(
                f"shape {shape.name!r}: {self.n_v_heads} value heads are not a multiple of "
                f"{self.n_heads} q/k heads in this branch",
                field="dn_v_heads",
            )
        self.head_dim = shape.dn_head_dim
        self.v_head_dim = shape.dn_v_head_dim
        self.d_conv = shape.dn_conv
        self.chunk_size = shape.dn_chunk
        self.key_dim = self.n_heads * self.head_dim
        self.inner_dim = self.n_v_heads * self.v_head_dim
        self.conv_dim = 2 * self.key_dim + self.inner_dim
        d, hv = shape.d_model, self.n_v_heads

        self.in_proj = Linear(d, self.conv_dim + self.inner_dim + 2 * hv, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim, bias=False
        )
        self.dt_bias = nn.Parameter(torch.empty(hv))
        self.A_log = nn.Parameter(torch.empty(hv))
        self.norm_weight = nn.Parameter(torch.empty(self.v_head_dim))
        if project:
            self.out_proj = Linear(self.inner_dim, d, bias=False)
            self.out_proj.is_residual_output = True
        if self.A_log.device.type != "meta":
            self.reset_special_parameters()

    @classmethod
    def param_count(cls, shape: Shape, *, fraction: float = 1.0, project: bool = True) -> int:
        """in_proj (q, k, v, gate, decay and strength per value head), the depthwise conv
        (no bias), dt_bias/A_log per value head, the shared norm scale, the output projection."""
        nh = _split(shape.dn_heads, fraction, "dn_heads", shape)
        nv = _split(shape.dn_v_heads, fraction, "dn_v_heads", shape)
        inner = nv * shape.dn_v_head_dim
        conv = 2 * nh * shape.dn_head_dim + inner
        d = shape.d_model
        total = d * (conv + inner + 2 * nv) + conv * shape.dn_conv + 2 * nv + shape.dn_v_head_dim
        return total + (inner * d if project else 0)

    @torch.no_grad()
    def reset_special_parameters(self) -> None:
        init_decay_and_step(self.A_log, self.dt_bias, A_INIT_RANGE)
        self.norm_weight.fill_(1.0)

    def init_cache(self, batch_size, max_len, *, device=None, dtype=None) -> DeltaNetCache:
        conv, state = zero_states(
            self, batch_size, (self.n_v_heads, self.head_dim, self.v_head_dim), device, dtype
        )
        return DeltaNetCache(conv_state=conv, state=state)

    def _scan(self, q, k, v, g, beta, initial_state):
        # CUDA inputs take fla's fused kernel when it is installed (fla_delta.py); benchmarks
        # swap in the step loop here.
        if use_fast_delta(v.device, v.dtype):
            return fla_gated_delta_rule(q, k, v, g, beta, self.chunk_size, initial_state)
        return gated_delta_rule_chunked(q, k, v, g, beta, self.chunk_size, initial_state)

    def forward(self, u: torch.Tensor, cache: DeltaNetCache | None = None) -> torch.Tensor:
        Bsz, T, _ = u.shape
        Hk, Hv, K, V = self.n_heads, self.n_v_heads, self.head_dim, self.v_head_dim
        qkv, gate, a, b = self.in_proj(u).split([self.conv_dim, self.inner_dim, Hv, Hv], dim=-1)
        conv_state = cache.conv_state if cache is not None else None
        qkv = causal_conv_silu(qkv, self.conv1d.weight, None, conv_state)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.inner_dim], dim=-1)
        # The normalisation, decay and strength in fp32 (fp64 for an fp64 model), also under
        # autocast: unit-norm keys keep I - beta k k^T a contraction, which the chunked scan's
        # conditioning relies on, and bf16 rounding of |k| would break that.
        work = torch.promote_types(u.dtype, torch.float32)
        q = _l2norm(q.reshape(Bsz, T, Hk, K).to(work))
        k = _l2norm(k.reshape(Bsz, T, Hk, K).to(work))
        if Hv != Hk:
            q = q.repeat_interleave(Hv // Hk, dim=2)
            k = k.repeat_interleave(Hv // Hk, dim=2)
        v = v.reshape(Bsz, T, Hv, V)
        g = -F.softplus(a.to(work) + self.dt_bias.to(work)) * self.A_log.to(work).exp()
        beta = torch.sigmoid(b.to(work))
        if cache is not None and T == 1:
            o, state = gated_delta_rule_step(
                cache.state, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0]
            )
            o = o[:, None]
        else:
            init = cache.state if cache is not None else None
            o, state = self._scan(q, k, v, g, beta, init)
        if cache is not None:
            cache.state.copy_(state)
            cache.pos += T
        o = F.rms_norm(o.to(work), (V,), eps=self.shape.norm_eps) * self.norm_weight.to(work)
        o = o.reshape(Bsz, T, self.inner_dim) * F.silu(gate.to(work))
        o = o.to(u.dtype)
        return self.out_proj(o) if self.project else o

    def extra_flops_per_token(self, seq_len: int) -> float:
        """Matmul FLOPs of the chunked scan (what training and prefill run), per token.

        See ``delta_rule.chunked_flops``; padding of the last chunk is counted. The conv's
        FLOPs are its parameters' (2 per weight per token, counted by the accounting);
        elementwise work (norms, gates, decays) is left out, as for attention's softmax. The
        recurrent step used for decoding costs about 8 Hv K V per token instead.
        """
        if seq_len <= 0:
            return 0.0
        h, K, V = self.n_v_heads, self.head_dim, self.v_head_dim
        return chunked_flops(seq_len, h, K, V, self.chunk_size) / seq_len

    def state_bytes(self, dtype_bytes: int = 2) -> int:
        """Conv inputs (in the model's dtype) plus the delta-rule state (always fp32)."""
        conv = self.conv_dim * (self.d_conv - 1) * dtype_bytes
        return conv + self.n_v_heads * self.head_dim * self.v_head_dim * 4
