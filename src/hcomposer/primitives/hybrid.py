"""[X|Y]: the intra-layer hybrid of the hybrid-architectures paper (arXiv 2510.04800).

Every branch runs on the same normed input with its share of the heads (1/k for
k branches). Each branch output gets its own norm (attention and Mamba outputs
differ in scale by more than 10x) and, for ``diff`` and ``add``, its own output
projection; the projected branches are then fused:

    diff:   y = P0(n0(b0)) - sum_{i>0} Pi(ni(bi))     (the paper's choice)
    add:    y = sum_i Pi(ni(bi))
    concat: y = P([n0(b0), n1(b1), ...])              (one shared projection)
"""

from __future__ import annotations

import torch
from torch import nn

from hcomposer.primitives.base import Linear, Primitive, RMSNorm
from hcomposer.shapes import Shape

__all__ = ["ParallelGroup"]


class ParallelGroup(Primitive):
    is_mixer = True

    def __init__(self, shape: Shape, tokens: tuple[str, ...], registry: dict[str, type]):
        super().__init__(shape)
        self.tokens = tokens
        self.token = "[" + "|".join(tokens) + "]"
        self.fusion = shape.fusion
        share = 1.0 / len(tokens)
        self.branches = nn.ModuleList(
            registry[t](shape, fraction=share, project=False) for t in tokens
        )
        self.norms = nn.ModuleList(
            nn.Identity() if b.normalized_output else RMSNorm(b.inner_dim, shape.norm_eps)
            for b in self.branches
        )
        d = shape.d_model
        if self.fusion == "concat":
            self.out_proj = Linear(sum(b.inner_dim for b in self.branches), d, bias=False)
            self.out_proj.is_residual_output = True
        else:
            self.out_projs = nn.ModuleList(
                Linear(b.inner_dim, d, bias=False) for b in self.branches
            )
            for p in self.out_projs:
                p.is_residual_output = True

    @classmethod
    def group_param_count(cls, shape: Shape, tokens: tuple[str, ...], registry) -> int:
        """Exact parameters of ``[X|Y|...]``, counted on the meta device (no weights)."""
        with torch.device("meta"):
            group = cls(shape, tokens, registry)
        return sum(p.numel() for p in group.parameters())

    def init_cache(self, batch_size, max_len, *, device=None, dtype=None):
        return [
            b.init_cache(batch_size, max_len, device=device, dtype=dtype) for b in self.branches
        ]

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        caches = cache if cache is not None else [None] * len(self.branches)
        outs = [n(b(x, cache=c)) for b, n, c in zip(self.branches, self.norms, caches)]
        if self.fusion == "concat":
            return self.out_proj(torch.cat(outs, dim=-1))
        ys = [p(o) for p, o in zip(self.out_projs, outs)]
        if self.fusion == "add":
            return torch.stack(ys).sum(0)
        y = ys[0]
        for other in ys[1:]:
            y = y - other
        return y

    def extra_flops_per_token(self, seq_len: int) -> float:
        return sum(b.extra_flops_per_token(seq_len) for b in self.branches)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return sum(b.kv_bytes_per_token(dtype_bytes) for b in self.branches)

    def state_bytes(self, dtype_bytes: int = 2) -> int:
        return sum(b.state_bytes(dtype_bytes) for b in self.branches)

    def reset_special_parameters(self) -> None:
        for b in self.branches:
            b.reset_special_parameters()
