"""E: a mixture-of-experts feed-forward sublayer.

Each token is scored by a linear router over ``n_experts`` SwiGLU experts of
width ``expert_ffn_dim``, sent to its ``top_k`` best experts and, when the shape
has ``n_shared_experts``, also through shared experts that every token uses:

    y = shared(x) + sum_{e in topk(x)} g_e(x) * expert_e(x)

Router (``shape.router``):

- ``softmax``: scores are the softmax over all experts; the gate of a chosen
  expert is its probability, not renormalised over the k chosen (Switch /
  DeepSeek-V2), so even top-1 routing passes a gradient to the router.
- ``sigmoid``: scores are independent sigmoids (DeepSeek-V3); the gates are the
  chosen scores normalised to sum to one over the k chosen. With top-1 that
  normalisation would make every gate exactly 1 and starve the router of
  gradient, so for ``top_k == 1`` the raw sigmoid score is the gate.

Balancing (``shape.moe_balance == "bias"``, auxiliary-loss-free, DeepSeek-V3
arXiv 2412.19437 section 2.1.2): a non-trainable per-expert bias is added to the
scores for *choosing* experts only; gates always come from the un-biased scores.
After every forward in training mode the bias moves by ``moe_bias_rate`` towards
equal load: down for experts above the mean load, up for those below. In eval
mode the bias is used but never changed, so evaluation and decoding are pure.

Dispatch is by index: the (token, expert) pairs are sorted by expert and the
tokens gathered in that order. Then either all experts run at once as batched
matmuls over tokens padded to the busiest expert's load (the default while the
padding at most doubles the work), or each expert runs on its contiguous slice
(when the load is very uneven). The weighted results are scattered back with
``index_add_``. No Python loop ever runs over tokens.

Load: ``last_load`` holds the tokens routed to each expert by the latest forward
(it sums to tokens x top_k); ``load_total`` accumulates it over the module's
life (reset with ``reset_load``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hcomposer.primitives.base import Linear, Primitive
from hcomposer.primitives.mlp import SwiGLU
from hcomposer.shapes import Shape

__all__ = ["MixtureOfExperts", "route"]


def route(
    logits: torch.Tensor, top_k: int, router: str, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose experts for router logits [N, E]: returns (indices [N, k], gates [N, k]).

    ``bias`` [E] shifts the scores used for the choice only. Computed in fp32.
    """
    logits = logits.float()
    scores = logits.softmax(-1) if router == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias.float()
    idx = choice.topk(top_k, dim=-1).indices
    gates = scores.gather(-1, idx)
    if router == "sigmoid" and top_k > 1:
        gates = gates / gates.sum(-1, keepdim=True).clamp_min(1e-20)
    return idx, gates


class MixtureOfExperts(Primitive):
    """Top-k routed SwiGLU experts plus optional shared experts. Stateless."""

    # The routing statistics and the selection bias (see ``_record``).
    forward_updates_state = True

    def __init__(self, shape: Shape, *, fraction: float = 1.0, project: bool = True):
        super().__init__(shape, fraction=fraction, project=project)
        d, h = shape.d_model, shape.expert_ffn_dim
        self.n_experts = shape.n_experts
        self.top_k = shape.top_k
        self.router_kind = shape.router
        self.balance = shape.moe_balance
        self.bias_rate = shape.moe_bias_rate
        self.router = Linear(d, self.n_experts, bias=False)
        # SwiGLU marks each down_proj as a residual output (scaled init).
        self.experts = nn.ModuleList(SwiGLU(d, h) for _ in range(self.n_experts))
        # n shared experts of width h are one SwiGLU of width n*h (their outputs add).
        n_shared = shape.n_shared_experts
        self.shared = SwiGLU(d, n_shared * h) if n_shared else None
        # Selection bias: state, not a parameter; saved with the model, kept in fp32.
        # "auto": grouped (batched) matmuls unless the load is very uneven; "loop" or
        # "grouped" force one path (tests hold both to the dense reference).
        self.dispatch = "auto"
        self.register_buffer("expert_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        self.register_buffer(
            "last_load", torch.zeros(self.n_experts, dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "load_total", torch.zeros(self.n_experts, dtype=torch.long), persistent=False
        )

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would round the bias; its updates (1e-3) are below bf16's
        # resolution near 1, so the bias stays in fp32 whatever the model's dtype.
        super()._apply(fn, recurse)
        if self.expert_bias.is_floating_point() and self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return self

    def reset_load(self) -> None:
        """Zero the cumulative load counter."""
        self.load_total.zero_()

    @classmethod
    def param_count(cls, shape: Shape, *, fraction: float = 1.0, project: bool = True) -> int:
        """The router, every routed expert and the shared experts (one SwiGLU of n x width)."""
        d, h = shape.d_model, shape.expert_ffn_dim
        return d * shape.n_experts + (shape.n_experts + shape.n_shared_experts) * 3 * d * h

    def inactive_params(self) -> int:
        """Parameters of the experts a token does not use: (n_experts - top_k) experts."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return (self.n_experts - self.top_k) * per_expert

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert indices [N, k], gates [N, k]) for tokens x [..., d_model]."""
        logits = self.router(x.reshape(-1, x.shape[-1]))
        bias = self.expert_bias if self.balance == "bias" else None
        return route(logits, self.top_k, self.router_kind, bias)

    def forward(self, x: torch.Tensor, cache: None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, gates = self.select(flat)
        n, k = idx.shape
        # Sort the n*k (token, expert) pairs by expert: expert e owns one contiguous slice.
        pair_expert = idx.reshape(-1)
        order = pair_expert.argsort(stable=True)
        pair_token = order // k
        sorted_expert = pair_expert[order]
        load = torch.bincount(pair_expert, minlength=self.n_experts)
        counts = load.tolist()  # the one host sync: slice sizes
        xs = flat[pair_token]
        if self._use_grouped(counts, n * k):
            ys = self._grouped(xs, sorted_expert, load, max(counts))
        else:
            ys = self._looped(xs, counts)
        ys = ys * gates.reshape(-1)[order].to(ys.dtype)[:, None]
        out = torch.zeros_like(flat).index_add_(0, pair_token, ys.to(flat.dtype))
        if self.shared is not None:
            out = out + self.shared(flat)
        self._record(load)
        return out.reshape(shape)

    def _use_grouped(self, counts: list[int], pairs: int) -> bool:
        if self.dispatch != "auto":
            return self.dispatch == "grouped"
        # Padding every expert to the busiest one's load must not more than double the work.
        return max(counts) * self.n_experts <= 2 * pairs

    def _looped(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Each used expert on its contiguous slice of the expert-sorted tokens."""
        outs = []
        start = 0
        for e, count in enumerate(counts):
            if count:
                outs.append(self.experts[e](xs[start : start + count]))
                start += count
        return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[-1])

    def _grouped(
        self, xs: torch.Tensor, sorted_expert: torch.Tensor, load: torch.Tensor, cap: int
    ) -> torch.Tensor:
        """All experts at once: tokens padded to [n_experts, cap, d], three batched matmuls.

        On CPU this is about 2.8x faster (forward+backward, proxy shape, 4096 tokens) than
        one small matmul chain per expert; the zero padding rows contribute nothing to
        outputs or gradients.
        """
        starts = torch.cumsum(load, 0) - load
        slot = torch.arange(len(xs), device=xs.device) - starts[sorted_expert]
        buf = xs.new_zeros(self.n_experts, cap, xs.shape[-1])
        buf = buf.index_put((sorted_expert, slot), xs)
        w_gate = torch.stack([e.gate_proj.weight for e in self.experts])  # [E, h, d]
        w_up = torch.stack([e.up_proj.weight for e in self.experts])
        w_down = torch.stack([e.down_proj.weight for e in self.experts])  # [E, d, h]
        h = F.silu(torch.bmm(buf, w_gate.mT)) * torch.bmm(buf, w_up.mT)
        return torch.bmm(h, w_down.mT)[sorted_expert, slot]

    @torch.no_grad()
    def _record(self, load: torch.Tensor) -> None:
        self.last_load.copy_(load)
        self.load_total.add_(load)
        if self.training and self.balance == "bias" and self.bias_rate > 0:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # Under DDP every rank moves the bias by the global load, so the ranks agree
                # (and DDP's broadcast of rank 0's buffers changes nothing).
                load = load.clone()
                dist.all_reduce(load)
            # DeepSeek-V3: b_e += rate * sign(mean load - load_e).
            err = load.float().mean() - load.float()
            self.expert_bias.add_(self.bias_rate * err.sign())
