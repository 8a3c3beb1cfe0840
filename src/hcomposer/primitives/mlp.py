"""F: the SwiGLU feed-forward network of Llama."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hcomposer.primitives.base import Linear, Primitive
from hcomposer.primitives.cpu_kernels import block_mlp as kernel_block_mlp
from hcomposer.primitives.cpu_kernels import swiglu as kernel_swiglu
from hcomposer.shapes import Shape

__all__ = ["SwiGLU", "MLP"]


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the building block of F, of experts and shared experts."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(d_model, hidden, bias=False)
        self.up_proj = Linear(d_model, hidden, bias=False)
        self.down_proj = Linear(hidden, d_model, bias=False)
        self.down_proj.is_residual_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":  # a decode step: one kernel
            h = kernel_swiglu(x, self.gate_proj.weight, self.up_proj.weight)
            if h is not None:
                return self.down_proj(h)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MLP(Primitive):
    """Stateless channel mixer: the cache argument is accepted and ignored."""

    def __init__(self, shape: Shape, *, fraction: float = 1.0, project: bool = True):
        super().__init__(shape, fraction=fraction, project=project)
        self.ffn = SwiGLU(shape.d_model, shape.ffn_dim)

    @classmethod
    def param_count(cls, shape: Shape, *, fraction: float = 1.0, project: bool = True) -> int:
        """gate, up and down projections of the SwiGLU."""
        return 3 * shape.d_model * shape.ffn_dim

    def forward(self, x: torch.Tensor, cache: None = None) -> torch.Tensor:
        return self.ffn(x)

    def decode_block(self, x: torch.Tensor, norm: nn.Module, cache: None) -> torch.Tensor | None:
        return kernel_block_mlp(x, norm, self.ffn)
