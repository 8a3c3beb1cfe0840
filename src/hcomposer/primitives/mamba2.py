"""S: the Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs"), SSD scan in ssd.py.

Layout, per token (d = d_model, I = inner = heads x head_dim, G groups, N state, H heads):

    in_proj: d -> [z (I), x (I), B (G*N), C (G*N), dt (H)]
    xBC = silu(causal depthwise conv1d over [x, B, C])        kernel ssm_conv, with bias
    dt = softplus(dt + dt_bias);  A = -exp(A_log)             one decay rate per head
    y = SSD(x, dt, A, B, C) + D * x
    y = RMSNorm(y * silu(z)), per group of I/G channels       the gated norm of Mamba-2
    out = out_proj(y)                                        I -> d (absent in a group branch)

As a branch of ``[A|S]`` it takes ``fraction`` of the SSM heads, has no out_proj and returns
the gated-normed ``y`` (already normalised: the group adds no second norm).

Decoding: the cache holds the last ``ssm_conv - 1`` conv inputs and the SSM state (fp32). One
new token takes the recurrent step; several (prefill, chunked prefill) run the conv over
[cached inputs, new] and the chunked scan from the cached state, so any split of a sequence
gives the full forward's outputs.

Initialisation: A = uniform in A_INIT_RANGE (see below), dt_bias = softplus^-1(dt) with dt
log-uniform in [1e-3, 1e-1] (floored at 1e-4), D = 1, gated norm weight = 1; in_proj/out_proj
follow the model's normal init, the conv keeps PyTorch's default (as in Mamba-2).

Fast path: when ``mamba_ssm`` is importable, CUDA inputs go through its Triton kernel
``mamba_chunk_scan_combined`` (announced once, when the first S layer is built). CPU inputs
always use the PyTorch scan. Set HCOMPOSER_SSD=torch to turn the kernel off.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hcomposer.errors import ShapeError
from hcomposer.primitives.base import Linear, Primitive
from hcomposer.primitives.cpu_kernels import block_ssm as kernel_block_ssm
from hcomposer.primitives.cpu_kernels import ssm_step as kernel_ssm_step
from hcomposer.primitives.decoding import fast_decoding
from hcomposer.primitives.optional_kernel import OptionalKernel
from hcomposer.primitives.short_conv import causal_conv_silu
from hcomposer.primitives.ssd import ssd_chunked, ssd_step
from hcomposer.shapes import Shape

__all__ = [
    "Mamba2",
    "Mamba2Cache",
    "GatedRMSNorm",
    "A_INIT_RANGE",
    "init_decay_and_step",
    "zero_states",
]

log = logging.getLogger(__name__)

# A = -a with a ~ U[A_INIT_RANGE]. Mamba-2's own default is U[1, 16]; the hybrid-architectures
# paper (arXiv 2510.04800), whose Mamba-2 recipe hcomposer reproduces, used U[0.01, 2.0] at 1B.
# We follow the paper: its hybrids are the reference results, and the smaller rates start every
# head with a slow decay (exp(-dt*a) >= 0.82 per step at the largest dt), i.e. long memory, which
# the recall tasks of the MAD/MQAR proxies need.
A_INIT_RANGE = (0.01, 2.0)
DT_RANGE = (1e-3, 1e-1)
DT_FLOOR = 1e-4

_KERNEL = OptionalKernel(
    package="mamba_ssm", top="mamba_ssm", module="mamba_ssm.ops.triton.ssd_combined",
    attr="mamba_chunk_scan_combined", env="HCOMPOSER_SSD",
)  # fmt: skip


def _announce_once() -> None:
    _KERNEL.announce(
        log,
        "hcomposer S (Mamba-2): CUDA inputs use mamba_ssm's mamba_chunk_scan_combined kernel; "
        "CPU inputs the PyTorch chunked scan (set HCOMPOSER_SSD=torch to use it everywhere)",
        "hcomposer S (Mamba-2): PyTorch chunked scan everywhere (%s)",
        used_level=logging.WARNING,
        fallback_level=logging.INFO,
    )


@torch.no_grad()
def init_decay_and_step(A_log: torch.Tensor, dt_bias: torch.Tensor, a_range) -> None:
    """The decay and step initialisation Mamba-2 and gated DeltaNet share: A uniform in
    ``a_range`` (stored as its log); dt log-uniform in ``DT_RANGE``, floored at ``DT_FLOOR``,
    stored as softplus^-1(dt)."""
    lo, hi = a_range
    a = torch.empty_like(A_log, dtype=torch.float32).uniform_(lo, hi)
    A_log.copy_(a.log())
    lo, hi = DT_RANGE
    u = torch.rand_like(dt_bias, dtype=torch.float32)
    dt = torch.exp(u * (math.log(hi) - math.log(lo)) + math.log(lo)).clamp(min=DT_FLOOR)
    # softplus^-1(dt) = dt + log(1 - exp(-dt)), written with expm1 for small dt.
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def zero_states(layer, batch_size: int, state_dims: tuple, device, dtype):
    """Empty decoding state of a short-conv + recurrent layer (``layer`` has ``conv_dim``,
    ``d_conv``, ``A_log`` and ``in_proj``): the conv window in the model's dtype, the recurrent
    state ``[batch, *state_dims]`` in at least fp32."""
    device = device if device is not None else layer.A_log.device
    dtype = dtype or layer.in_proj.weight.dtype
    conv = torch.zeros(batch_size, layer.conv_dim, layer.d_conv - 1, device=device, dtype=dtype)
    state = torch.zeros(
        batch_size, *state_dims, device=device, dtype=torch.promote_types(dtype, torch.float32)
    )
    return conv, state


@dataclass
class Mamba2Cache:
    """Decoding state of one S layer: constant size, whatever the context length."""

    conv_state: torch.Tensor  # [B, conv_channels, ssm_conv - 1]: the last conv inputs
    ssm_state: torch.Tensor  # [B, heads, head_dim, ssm_state], fp32 (fp64 for an fp64 model)
    pos: int = 0


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) over groups of ``group_size`` channels (Mamba-2's norm), in fp32."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        work = torch.promote_types(y.dtype, torch.float32)
        g = y.to(work) * F.silu(z.to(work))
        shape = g.shape
        g = g.view(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        g = F.rms_norm(g, (self.group_size,), eps=self.eps)
        return (g.view(shape) * self.weight.to(work)).to(out_dtype)


class Mamba2(Primitive):
    """The S primitive; see the module docstring."""

    normalized_output = True

    def __init__(self, shape: Shape, *, fraction: float = 1.0, project: bool = True):
        super().__init__(shape, fraction=fraction, project=project)
        heads = round(shape.ssm_heads * fraction)
        if heads < 1 or abs(heads - shape.ssm_heads * fraction) > 1e-6:
            raise ShapeError(
                f"shape {shape.name!r}: ssm_heads={shape.ssm_heads} (ssm_expand*d_model/"
                f"ssm_head_dim) cannot be split into a {fraction:.3g} share for a parallel group",
                field="ssm_head_dim",
            )
        if heads % shape.ssm_groups:
            raise ShapeError(
                f"shape {shape.name!r}: ssm_groups={shape.ssm_groups} must divide the {heads} "
                "SSM heads of this branch",
                field="ssm_groups",
            )
        self.n_heads = heads
        self.head_dim = shape.ssm_head_dim
        self.d_state = shape.ssm_state
        self.n_groups = shape.ssm_groups
        self.d_conv = shape.ssm_conv
        self.chunk_size = shape.ssm_chunk
        self.inner_dim = heads * self.head_dim
        self.conv_dim = self.inner_dim + 2 * self.n_groups * self.d_state
        d = shape.d_model

        self.in_proj = Linear(d, self.inner_dim + self.conv_dim + heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim, bias=True
        )
        self.dt_bias = nn.Parameter(torch.empty(heads))
        self.A_log = nn.Parameter(torch.empty(heads))
        self.D = nn.Parameter(torch.empty(heads))
        self.norm = GatedRMSNorm(self.inner_dim, self.inner_dim // self.n_groups, shape.norm_eps)
        if project:
            self.out_proj = Linear(self.inner_dim, d, bias=False)
            self.out_proj.is_residual_output = True
        if self.A_log.device.type != "meta":
            self.reset_special_parameters()
        _announce_once()

    @classmethod
    def param_count(cls, shape: Shape, *, fraction: float = 1.0, project: bool = True) -> int:
        """in_proj (z, x/B/C, dt), the depthwise conv with bias, dt_bias/A_log/D per head, the
        gated norm's scale, and the output projection when it has one."""
        heads = round(shape.ssm_heads * fraction)
        inner = heads * shape.ssm_head_dim
        conv = inner + 2 * shape.ssm_groups * shape.ssm_state
        d = shape.d_model
        total = d * (inner + conv + heads) + conv * (shape.ssm_conv + 1) + 3 * heads + inner
        return total + (inner * d if project else 0)

    @torch.no_grad()
    def reset_special_parameters(self) -> None:
        init_decay_and_step(self.A_log, self.dt_bias, A_INIT_RANGE)
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)

    def init_cache(self, batch_size, max_len, *, device=None, dtype=None) -> Mamba2Cache:
        conv, state = zero_states(
            self, batch_size, (self.n_heads, self.head_dim, self.d_state), device, dtype
        )
        return Mamba2Cache(conv_state=conv, ssm_state=state)

    def _scan(self, x, dt, A, B, C, initial_state):
        if x.is_cuda and _KERNEL.available():
            y, final = _KERNEL.fn(
                x,
                dt,
                A,
                B,
                C,
                self.chunk_size,
                initial_states=initial_state,
                return_final_states=True,
            )
            return y, final.float()
        return ssd_chunked(x, dt, A, B, C, self.chunk_size, initial_state)

    def _decode_step(self, u: torch.Tensor, cache: Mamba2Cache) -> torch.Tensor:
        """One new token [B, 1, d] with the state updated in place (the fast decode path).

        The same arithmetic as ``forward`` with ``ssd_step``, in fewer and smaller operations:
        the conv as one dot product per channel and everything after the input projection in
        the work dtype (fp32 for bf16 models; the reference rounds the conv output to bf16).
        """
        Bsz = u.shape[0]
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state
        work = cache.ssm_state.dtype
        zxbcdt = self.in_proj(u[:, 0])
        if zxbcdt.dtype == torch.bfloat16 and zxbcdt.device.type == "cpu":
            y = kernel_ssm_step(self, zxbcdt, cache)  # the rest of this step, fused
            if y is not None:
                cache.pos += 1
                y = y[:, None]
                return self.out_proj(y) if self.project else y
        z, xbc, dt = zxbcdt.split([self.inner_dim, self.conv_dim, H], dim=-1)
        window = torch.cat([cache.conv_state, xbc[..., None].to(cache.conv_state.dtype)], dim=-1)
        cache.conv_state.copy_(window[..., 1:])
        w = self.conv1d.weight[:, 0].to(work)
        xbc = F.silu((window.to(work) * w).sum(-1) + self.conv1d.bias.to(work))
        x, B, C = xbc.split([self.inner_dim, G * N, G * N], dim=-1)
        x = x.view(Bsz, H, P)
        dt = F.softplus(dt.to(work) + self.dt_bias.to(work))  # [B, H]
        decay = torch.exp(dt * -torch.exp(self.A_log.to(work)))
        # Heads of one group share B and C: [B, G, 1, N] broadcast over the group's heads.
        Bh = B.view(Bsz, G, 1, 1, N)
        Ch = C.view(Bsz, G, 1, 1, N)
        state = cache.ssm_state.view(Bsz, G, H // G, P, N)
        state.mul_(decay.view(Bsz, G, H // G, 1, 1))
        state.add_((dt[..., None] * x).view(Bsz, G, H // G, P, 1) * Bh)
        # A broadcast product and sum: a batched matmul of these shapes is slower on CPU.
        y = (state * Ch).sum(-1).view(Bsz, H, P)
        cache.pos += 1
        y = torch.addcmul(y, x, self.D.to(work)[:, None])
        y = self.norm(y.reshape(Bsz, 1, self.inner_dim), z[:, None], u.dtype)
        return self.out_proj(y) if self.project else y

    def decode_block(self, x: torch.Tensor, norm: nn.Module, cache) -> torch.Tensor | None:
        if cache is None or not fast_decoding() or torch.is_grad_enabled():
            return None
        return kernel_block_ssm(x, norm, self, cache)

    def forward(self, u: torch.Tensor, cache: Mamba2Cache | None = None) -> torch.Tensor:
        Bsz, T, _ = u.shape
        # The fast step updates the state in place: not for graphs that backpropagate.
        if cache is not None and T == 1 and fast_decoding() and not torch.is_grad_enabled():
            return self._decode_step(u, cache)
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state
        z, xbc, dt = self.in_proj(u).split([self.inner_dim, self.conv_dim, H], dim=-1)
        conv_state = cache.conv_state if cache is not None else None
        xbc = causal_conv_silu(xbc, self.conv1d.weight, self.conv1d.bias, conv_state)
        x, B, C = xbc.split([self.inner_dim, G * N, G * N], dim=-1)
        x = x.reshape(Bsz, T, H, P)
        # dt, A and the D skip in fp32 (fp64 for an fp64 model), also under autocast.
        work = torch.promote_types(u.dtype, torch.float32)
        dt = F.softplus(dt.to(work) + self.dt_bias.to(work))
        A = -torch.exp(self.A_log.to(work))
        # The PyTorch scans compute in the work dtype: given x in it, their output stays in it
        # (no round trip through bf16 before the D skip). mamba_ssm's kernel takes x as it is.
        xw = x.to(work)
        if cache is not None and T == 1:
            y, state = ssd_step(
                cache.ssm_state, xw[:, 0], dt[:, 0], A, B.view(Bsz, G, N), C.view(Bsz, G, N)
            )
            y = y[:, None]
        else:
            init = cache.ssm_state if cache is not None else None
            xs = x if x.is_cuda and _KERNEL.available() else xw
            y, state = self._scan(xs, dt, A, B.view(Bsz, T, G, N), C.view(Bsz, T, G, N), init)
        if cache is not None:
            cache.ssm_state.copy_(state)
            cache.pos += T
        y = torch.addcmul(y.to(work), xw, self.D.to(work)[:, None])
        y = self.norm(y.reshape(Bsz, T, self.inner_dim), z, u.dtype)
        return self.out_proj(y) if self.project else y

    def extra_flops_per_token(self, seq_len: int) -> float:
        """Matmul FLOPs of the chunked scan (what training and prefill run), per token.

        Per chunk of L = min(ssm_chunk, seq_len) steps: C B^T per group (2 L^2 G N), the
        masked product with x per head (2 L^2 H P), the chunk state (2 L H P N) and the
        start state's output (2 L H P N). Padding of the last chunk is counted: it is
        computed. Elementwise work (decays, gates, the conv, the D skip, and the passing of
        states from chunk to chunk, one multiply-add of H P N per chunk) is left out, as for
        attention's softmax.
        The recurrent step used for decoding costs about 4 H P N per token instead.
        """
        if seq_len <= 0:
            return 0.0
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state
        L = min(self.chunk_size, seq_len)
        nc = -(-seq_len // L)
        per_chunk = 2 * L * L * G * N + 2 * L * L * H * P + 4 * L * H * P * N
        return nc * per_chunk / seq_len

    def state_bytes(self, dtype_bytes: int = 2) -> int:
        """Conv inputs (in the model's dtype) plus the SSM state (always fp32), per sequence."""
        conv = self.conv_dim * (self.d_conv - 1) * dtype_bytes
        return conv + self.n_heads * self.head_dim * self.d_state * 4
