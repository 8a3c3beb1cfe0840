"""The causal language model built from an Architecture.

Layout: token embedding -> for each sublayer ``x = x + primitive(norm(x))`` ->
final RMSNorm -> output head (tied to the embedding when the shape says so).

Initialisation (documented, deterministic under ``torch.manual_seed``):
every Linear and the embedding are drawn from N(0, init_std); projections that
write into the residual stream (attention o_proj, MLP down_proj, Mamba out_proj,
group output projections, marked ``is_residual_output``) use
init_std / sqrt(n_sublayers), so the residual stream's variance does not grow
with depth (GPT-2's scheme, one residual per sublayer here); norms start at 1;
primitives then apply their own special initialisation (Mamba-2's A, dt, D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hcomposer.architecture import Architecture
from hcomposer.primitives import Linear, Primitive, RMSNorm, build_sublayer

__all__ = ["ChunkedCrossEntropy", "HybridLM", "ModelCache", "build_model", "init_module", "lm_loss"]


@dataclass
class ModelCache:
    """One cache per sublayer (None for stateless ones) and the number of tokens seen."""

    layers: list[Any]
    max_len: int
    pos: int = 0


class Block(nn.Module):
    """x + primitive(norm(x)): written once, shared by every primitive."""

    def __init__(self, prim: Primitive, d_model: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.mixer = prim

    def forward(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        if x.shape[1] == 1 and x.dtype == torch.bfloat16 and x.is_cpu:  # a CPU decode step
            y = self.mixer.decode_block(x, self.norm, cache)
            if y is not None:
                return y
        return x + self.mixer(self.norm(x), cache=cache)


class HybridLM(nn.Module):
    """A causal LM whose sublayers follow ``arch.layers``."""

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        s = arch.shape
        self.embed = nn.Embedding(s.vocab_size, s.d_model)
        self.layers = nn.ModuleList(
            Block(build_sublayer(tokens, s), s.d_model, s.norm_eps) for tokens in arch.layers
        )
        self.norm = RMSNorm(s.d_model, s.norm_eps)
        self.lm_head = Linear(s.d_model, s.vocab_size, bias=False)
        if s.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def shape(self):
        return self.arch.shape

    def reset_parameters(self) -> None:
        """The initialisation described in the module docstring."""
        # Two passes (plain layers, then the primitives' own parameters): the order in which
        # the seeded generator is drawn, which fixes every seeded model's weights.
        for m in self.modules():
            init_module(m, self.arch, special=False)
        for m in self.modules():
            if isinstance(m, Primitive):
                m.reset_special_parameters()

    def init_cache(
        self, batch_size: int = 1, max_len: int | None = None, *, device=None, dtype=None
    ) -> ModelCache:
        """A fresh cache for incremental decoding of up to ``max_len`` tokens."""
        max_len = max_len or self.arch.shape.max_seq_len
        device = device or self.embed.weight.device
        caches = [
            blk.mixer.init_cache(batch_size, max_len, device=device, dtype=dtype)
            for blk in self.layers
        ]
        return ModelCache(layers=caches, max_len=max_len)

    def hidden_states(self, tokens: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, d_model]."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}")
        if cache is not None and cache.pos + tokens.shape[1] > cache.max_len:
            raise ValueError(
                f"cache holds {cache.max_len} tokens; {cache.pos} used, "
                f"{tokens.shape[1]} more asked"
            )
        x = self.embed(tokens)
        for i, blk in enumerate(self.layers):
            x = blk(x, cache=None if cache is None else cache.layers[i])
        if cache is not None:
            cache.pos += tokens.shape[1]
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for tokens [B, T]; with a cache, continue from ``cache.pos``."""
        return self.lm_head(self.hidden_states(tokens, cache))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
        """Mean next-token cross-entropy (targets already shifted), computed in fp32."""
        return lm_loss(self(tokens), targets, ignore_index)

    @torch.no_grad()
    def generate(
        self,
        tokens: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        eos_token_id: int | None = None,
    ) -> torch.Tensor:
        """Continue ``tokens`` [B, T]: greedy at temperature 0, else sampled (optionally top-k)."""
        B, T = tokens.shape
        cache = self.init_cache(B, T + max_new_tokens)
        logits = self(tokens, cache=cache)[:, -1]
        out = [tokens]
        done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            nxt = _sample(logits.float(), temperature, top_k, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if eos_token_id is not None and bool(done.all()):
                break
            logits = self(nxt[:, None], cache=cache)[:, -1]
        return torch.cat(out, dim=1)


def _sample(logits, temperature, top_k, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def init_module(module: nn.Module, arch: Architecture, *, special: bool = True) -> None:
    """Initialise one module's own parameters with the scheme of the module docstring.

    Linear weights ~ N(0, init_std), residual outputs scaled by 1/sqrt(sublayers); embeddings
    ~ N(0, init_std); norms 1; with ``special``, a primitive's own parameters as it defines them.
    """
    std = arch.shape.init_std
    if isinstance(module, nn.Linear):
        residual = getattr(module, "is_residual_output", False)
        nn.init.normal_(
            module.weight, 0.0, std / math.sqrt(max(1, arch.n_sublayers)) if residual else std
        )
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, 0.0, std)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)
    if special and isinstance(module, Primitive):
        module.reset_special_parameters()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The language-model loss: mean cross-entropy in fp32 over targets not ``ignore_index``.

    ``HybridLM.loss`` is this on the model's logits; the trainer calls it on the logits of the
    compiled or DDP-wrapped model. On CPU it is :class:`ChunkedCrossEntropy` (equal to
    ``F.cross_entropy(logits.float(), ...)``, the form used elsewhere, within rounding:
    tests/test_fast_paths.py).
    """
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if logits.device.type != "cpu":  # one fused kernel each way there: launches would cost more
        return F.cross_entropy(flat.float(), flat_targets, ignore_index=ignore_index)
    return ChunkedCrossEntropy.apply(flat, flat_targets, ignore_index)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits [N, V] (any float dtype) in fp32, a few rows at a time.

    ``F.cross_entropy(logits.float())`` makes an fp32 copy of all the logits, an fp32
    log-softmax of them, and in backward an fp32 gradient that is then cast to the logits'
    dtype: three full [N, V] fp32 tensors. Here each block of rows is converted to fp32,
    reduced to its log-sum-exp and dropped; backward rebuilds each block's softmax from the
    kept log-sum-exp and writes the gradient straight into the logits' dtype. A block holds
    about ``BLOCK`` logits (4 MiB in fp32, cache-sized). On the 2-core CPU at N 256, V 8192,
    forward and backward took 0.57x the plain form's time in bf16, 0.9x in fp32 (2026-12-07).
    """

    BLOCK = 2**20

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        rows = max(1, ChunkedCrossEntropy.BLOCK // logits.shape[1])
        lse = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
        for s in range(0, logits.shape[0], rows):
            x = logits[s : s + rows].to(torch.float32, copy=True)
            m = x.amax(-1, keepdim=True)
            lse[s : s + len(x)] = x.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        count = valid.sum()
        ctx.save_for_backward(logits, safe, valid, lse, count)
        ctx.rows = rows
        return torch.where(valid, lse - picked, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        logits, safe, valid, lse, count = ctx.saved_tensors
        grad = torch.empty_like(logits)
        # d loss / d logit = (softmax - onehot(target)) / count on valid rows, 0 elsewhere.
        row_scale = valid.to(torch.float32) * (grad_loss / count)
        rows = ctx.rows
        minus_one = torch.full((min(rows, len(safe)), 1), -1.0, device=logits.device)
        for s in range(0, logits.shape[0], rows):
            e = s + rows
            p = logits[s:e].to(torch.float32, copy=True).sub_(lse[s:e, None]).exp_()
            p.scatter_add_(1, safe[s:e, None], minus_one[: len(p)])
            grad[s:e] = p.mul_(row_scale[s:e, None])
        return grad, None, None


def build_model(
    arch: Architecture | str,
    *,
    shape: Any = None,
    device: Any = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> HybridLM:
    """Build and initialise the model for an architecture (or a pattern plus ``shape``).

    On the meta device nothing is allocated or initialised: used for accounting.
    """
    if isinstance(arch, str):
        arch = Architecture.parse(arch, shape=shape or "tiny")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if seed is not None:
        torch.manual_seed(seed)
    with device:
        model = HybridLM(arch)
    if device.type != "meta":
        model.reset_parameters()
    if dtype is not None:
        model = model.to(dtype)
    return model
