"""D's fast path on CUDA: flash-linear-attention's chunked gated delta-rule kernel.

When the ``fla`` package (``fla-core`` or ``flash-linear-attention``, the ``cuda`` extra) imports
together with Triton, CUDA inputs of the gated delta rule go through
``fla.ops.gated_delta_rule.chunk_gated_delta_rule``; CPU inputs always use
``delta_rule.gated_delta_rule_chunked``. The choice is made per call from the inputs' device,
so one process can hold CPU and CUDA models. HCOMPOSER_DELTA=torch turns the kernel off.

The first time a CUDA input reaches D, one line is logged: a warning when the kernel is not
usable (with the reason and the extra to install), an info line when it is.

Conventions (the same as ours, checked by tests/test_fast_kernels.py): [b, t, h, d] layout;
g the log of the decay (<= 0), natural log; beta the write strength after the sigmoid; q and k
normalised by the caller (``use_qk_l2norm_in_kernel`` stays off, so D's own normalisation in
fp32 is what both paths see); scale d_k ** -0.5; states [b, h, d_k, d_v]. Following fla's own
layer, g stays fp32 and q, k, beta take v's dtype. fp64 inputs use our scan (the kernel's
tests cover bf16/fp16/fp32). The kernel takes chunks of 16, 32 or 64 only; other chunk sizes
run at 64 (the chunk size changes the order of the arithmetic, not the result).
"""

from __future__ import annotations

import logging

import torch

from hcomposer.primitives.optional_kernel import OptionalKernel

__all__ = [
    "fast_delta_available",
    "fast_delta_reason",
    "use_fast_delta",
    "fla_gated_delta_rule",
    "FLA_CHUNKS",
]

log = logging.getLogger(__name__)

FLA_CHUNKS = (16, 32, 64)
_KERNEL = OptionalKernel(
    package="flash-linear-attention", top="fla", module="fla.ops.gated_delta_rule",
    attr="chunk_gated_delta_rule", env="HCOMPOSER_DELTA",
)  # fmt: skip


def fast_delta_available() -> bool:
    """True when fla's chunked gated delta-rule kernel imports (it runs on CUDA inputs only)."""
    return _KERNEL.available()


def fast_delta_reason() -> str:
    """Why the kernel is not used ("" when it is usable)."""
    return "" if fast_delta_available() else _KERNEL.reason


def use_fast_delta(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether inputs on ``device`` in ``dtype`` take fla's kernel; announces the choice once
    per process when the first CUDA input arrives (CPU inputs say nothing: they always use
    our scan)."""
    if device.type != "cuda":
        return False
    _KERNEL.announce(
        log,
        "hcomposer D (Gated DeltaNet): CUDA inputs use fla's chunk_gated_delta_rule",
        "hcomposer D (Gated DeltaNet): CUDA inputs use the PyTorch chunked scan (%s; "
        "pip install 'hcomposer[cuda]' for the fused kernel)",
    )
    return fast_delta_available() and dtype != torch.float64


def fla_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``gated_delta_rule_chunked``'s contract through fla's kernel: o [b,t,h,d_v] in v's
    dtype and the final state [b,h,d_k,d_v] in fp32. Needs ``fast_delta_available()``."""
    if not fast_delta_available():
        raise RuntimeError(f"fla's gated delta-rule kernel is not usable: {_KERNEL.reason}")
    dtype = v.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        o, final = _KERNEL.fn(
            q.to(dtype),
            k.to(dtype),
            v,
            g.float(),
            beta.to(dtype),
            scale=q.shape[-1] ** -0.5,
            initial_state=None if initial_state is None else initial_state.float(),
            output_final_state=True,
            chunk_size=chunk_size if chunk_size in FLA_CHUNKS else 64,
        )
    return o.to(dtype), final.float()
