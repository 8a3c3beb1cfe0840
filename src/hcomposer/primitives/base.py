"""The one interface every primitive implements.

A primitive is one residual sublayer's computation, without the norm and the
residual add (the model wires those once, for all primitives):

    y = primitive(x, cache=None)          # x: [B, T, d_model] -> y: [B, T, d_model]

Sequence mixers (A, W, S) may also be branches of an intra-layer group
``[A|S]``; then they are built with ``fraction`` = their share of the heads and
``project=False``, return their inner activations ``[B, T, inner_dim]``, and the
group applies a norm and an output projection per branch.

Caches: ``init_cache`` returns a small mutable object (or None for stateless
primitives such as F and E). ``forward`` with a cache reads and updates it in
place, so that feeding a sequence in pieces (prefill then one token at a time)
gives the same outputs as one full forward.

Costs: every primitive reports, from its own sizes, the FLOPs per token that its
parameters do not account for (attention scores, the SSM scan), the KV-cache
bytes each token adds, and the bytes of state each sequence holds whatever its
length. Parameter counts come from the modules themselves (meta device).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hcomposer.primitive_specs import PrimitiveSpec, spec_of_class
from hcomposer.primitives.cpu_kernels import linear as kernel_linear
from hcomposer.primitives.cpu_kernels import rmsnorm as kernel_rmsnorm
from hcomposer.shapes import Shape

__all__ = ["Primitive", "RMSNorm", "Linear"]


class _FromSpec:
    """A class attribute read from the primitive's entry in the registry
    (``hcomposer.primitive_specs``): the entry of the class itself, or of the nearest base
    class that has one (``default`` where none has, e.g. a base class such as ``Primitive``).
    Read on every access, so a class registered after it was defined answers too; a subclass
    or an instance may still set its own value."""

    def __init__(self, read, default):
        self.read, self.default = read, default

    def __get__(self, obj, owner: type) -> object:
        for klass in owner.__mro__:
            found: PrimitiveSpec | None = spec_of_class(klass.__module__, klass.__qualname__)
            if found is not None:
                return self.read(found)
        return self.default


class Primitive(nn.Module):
    """Base class: see the module docstring for the contract.

    ``token`` (its letter in patterns) and ``is_mixer`` (a sequence mixer, which may sit in a
    parallel group) are the registry's ``token`` and ``mixer``, read from there."""

    token: ClassVar[str] = _FromSpec(lambda s: s.token, "?")  # type: ignore[assignment]
    is_mixer: ClassVar[bool] = _FromSpec(lambda s: s.mixer, False)  # type: ignore[assignment]
    # True when the inner output is already normalised (Mamba-2's gated RMSNorm),
    # so a parallel group adds no second norm on that branch.
    normalized_output: ClassVar[bool] = False
    # True when a training forward writes module state (buffers) that two forwards running
    # at once would share: the trainer then refuses to split a batch over threads.
    forward_updates_state: ClassVar[bool] = False

    def __init__(self, shape: Shape, *, fraction: float = 1.0, project: bool = True):
        super().__init__()
        self.shape = shape
        self.fraction = fraction
        self.project = project
        # Width of the activations before the output projection (mixers only).
        self.inner_dim = shape.d_model

    @classmethod
    def param_count(cls, shape: Shape, *, fraction: float = 1.0, project: bool = True) -> int:
        """Exact parameters of this primitive at ``shape``, without allocating weights.

        The default builds it on the meta device and counts; the built-in primitives state
        the closed form instead, and ``tests/test_primitive_contract.py`` holds every
        registered primitive's answer equal to its built module's."""
        with torch.device("meta"):
            module = cls(shape, fraction=fraction, project=project)
        return sum(p.numel() for p in module.parameters())

    def init_cache(
        self, batch_size: int, max_len: int, *, device: Any = None, dtype: Any = None
    ) -> Any:
        """A fresh cache for incremental decoding, or None if the primitive is stateless."""
        return None

    def extra_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token beyond 2 x (matmul parameters), averaged over a sequence."""
        return 0.0

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Cache bytes that grow with every token of context (global attention's KV)."""
        return 0

    def state_bytes(self, dtype_bytes: int = 2) -> int:
        """Cache bytes per sequence that do not grow with context (SSM state, rolling window)."""
        return 0

    def reset_special_parameters(self) -> None:
        """Initialise parameters that need more than the model's default normal init."""

    def decode_block(self, x: torch.Tensor, norm: nn.Module, cache: Any) -> torch.Tensor | None:
        """``x + self(norm(x), cache)`` for one decode step as a single fused CPU kernel, or
        None where there is none (the caller then runs the modules; nothing was changed)."""
        return None


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in fp32.

    ``fused`` (the default) takes ``torch.nn.functional.rms_norm``; False, the plain ops it is
    held to: ``x * rsqrt(mean(x^2) + eps) * weight``.
    """

    fused: bool = True

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":  # a decode step: one kernel
            y = kernel_rmsnorm(x, self.weight, self.eps)
            if y is not None:
                return y
        if self.fused:
            # One ATen op forward and backward (about 1.7x faster than the ops below on this
            # CPU in fp32; tests/test_fast_paths.py holds both equal in value and gradient).
            y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
            return y.to(x.dtype)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(dtype)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and training path) whose forward takes the
    fused bf16 CPU kernel (``hcomposer.primitives.cpu_kernels.linear``) for inputs of a few
    rows outside autograd: the single-token decode step. Everywhere else it is ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            y = kernel_linear(x, self.weight, self.bias)
            if y is not None:
                return y
        return F.linear(x, self.weight, self.bias)
