"""What one training step of an architecture holds and computes, from the shape alone.

The model behind ``hcomposer plan`` (``hcomposer.pipeline.plan`` puts it together per stage):

- :func:`matmul_flops_per_token`: forward FLOPs of the matrix products only (every weight
  matrix of 2 or more dimensions the token uses, the output head, and each primitive's own
  non-parametric matmuls: attention scores, the chunked scans). This is what
  ``torch.utils.flop_counter`` counts; ``accounting.count_costs`` also counts norm scales
  and other vectors as 2 FLOPs per weight, which this leaves out. A training step is
  3 x the forward (the backward computes a gradient for the input and one for the weight).
- :func:`activation_bytes_per_token`: the bytes autograd saves for the backward per token of
  a micro-batch, per sublayer and for the embedding/head, from a count of the tensors each
  primitive's PyTorch code path saves (``tests/test_plan.py`` holds it to the bytes counted
  through ``torch.autograd.graph.saved_tensors_hooks``). Fused GPU kernels (flash
  attention, mamba_ssm, flash-linear-attention) save about as much or less.
- :func:`training_memory`: per-GPU bytes of weights, gradients, AdamW state and activations.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

from hcomposer.architecture import Architecture
from hcomposer.model import build_model

__all__ = [
    "TrainingMemory",
    "activation_bytes_per_token",
    "matmul_flops_per_token",
    "training_memory",
]


@functools.lru_cache(maxsize=8)
def _meta_model(arch: Architecture):
    """The model on the meta device (no memory), shared by a plan's several estimates."""
    return build_model(arch, device="meta")


def _matrix_params(module) -> int:
    """Elements of the module's weights with two or more dimensions (its matmul weights)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if p.dim() >= 2 and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def matmul_flops_per_token(arch: Architecture, seq_len: int) -> float:
    """Forward matmul FLOPs per token at ``seq_len`` (see the module docstring).

    A mixture of experts counts the ``top_k`` experts a token uses (the dense-equivalent
    work; a dispatch that pads experts to the busiest one's load does more).
    """
    model = _meta_model(arch)
    s = arch.shape
    flops = 2.0 * s.vocab_size * s.d_model  # the head; the input embedding is a lookup
    for blk in model.layers:
        prim = blk.mixer
        matrices = _matrix_params(prim)
        if hasattr(prim, "experts"):
            per_expert = _matrix_params(prim.experts[0])
            matrices -= (prim.n_experts - prim.top_k) * per_expert
        flops += 2.0 * matrices + prim.extra_flops_per_token(seq_len)
    return flops


def _attention(p, batch: int) -> float:
    # Projections of q, k, v (k and v before the rotary embedding: q and k after it), the
    # output and its log-sum-exp per head (SDPA), and the rotary tables shared by a batch.
    q, kv = p.n_heads * p.head_dim, p.n_kv_heads * p.head_dim
    return 2 * q + 2 * kv + p.n_heads + 2 * p.head_dim / batch


def _swiglu(hidden: int) -> float:
    # gate and up outputs, silu(gate), and silu(gate) * up (the down projection's input).
    return 4.0 * hidden


def _moe(p, d: int) -> float:
    hidden = p.experts[0].down_proj.in_features if hasattr(p.experts[0], "down_proj") else 0
    shared = p.shared.down_proj.in_features if p.shared is not None else 0
    # Each routed (token, expert) pair: the gathered input, the SwiGLU, the gated output;
    # the router's logits and probabilities; the scattered sum.
    return p.top_k * (2 * d + _swiglu(hidden)) + _swiglu(shared) + 2 * p.n_experts + 2 * d


def _scan(heads: int, k: int, v: int, chunk: int, seq_len: int) -> float:
    # Per chunk of L steps: L x L decay, score and masked-product matrices per head, and
    # the k x v chunk states per head (one per chunk: / L per token), kept for the backward.
    L = min(chunk, seq_len)
    return 3.0 * heads * L + 2.0 * heads * k * v / L


def _mamba2(p, seq_len: int) -> float:
    inner, conv = p.inner_dim, p.conv_dim
    proj = inner + conv + p.n_heads
    scan = _scan(p.n_heads, p.head_dim, p.d_state, p.chunk_size, seq_len) + 2 * inner
    # in_proj outputs, conv input and pre-activation, the scan, the gated norm, out_proj in.
    return proj + 2 * conv + scan + 4 * inner + 1 + inner


def _deltanet(p, seq_len: int) -> float:
    inner, conv, hv = p.inner_dim, p.conv_dim, p.n_v_heads
    proj = conv + inner + 2 * hv
    # q and k: L2-normalised (input and output, fp32 work dtype) and repeated to hv heads.
    qk = 4 * p.key_dim + 2 * hv * p.head_dim
    scan = _scan(hv, p.head_dim, p.v_head_dim, p.chunk_size, seq_len) + 2 * inner
    # gates (decay, strength), the per-head norm, the output gate, out_proj's input.
    return proj + 2 * conv + qk + 4 * hv + scan + (2 * inner + hv) + 2 * inner + inner


def _mixer_elements(p, d: int, seq_len: int, batch: int) -> float:
    if hasattr(p, "branches"):
        # [X|Y]: each branch on its share, a norm per branch, the fused output.
        return sum(_mixer_elements(b, d, seq_len, batch) for b in p.branches) + 2 * d
    token = getattr(p, "token", "")
    if token in ("A", "W"):
        return _attention(p, batch)
    if token == "F":
        return _swiglu(p.ffn.down_proj.in_features)
    if token == "E":
        return _moe(p, d)
    if token == "S":
        return _mamba2(p, seq_len)
    if token == "D":
        return _deltanet(p, seq_len)
    # A registered primitive this model does not know: its output and its input.
    return 2.0 * d


def activation_bytes_per_token(
    arch: Architecture, *, seq_len: int, batch: int = 1, dtype_bytes: int = 2
) -> float:
    """Bytes saved for the backward per token of a ``batch x seq_len`` micro-batch.

    Each sublayer's pre-norm keeps its input, the inverse RMS and the normed output
    (3 d + 1); the final norm the same; the loss its fp32 log-probabilities over the
    vocabulary and the int64 targets. ``dtype_bytes``: 4 in fp32, 2 under bf16 autocast
    (where the norms' statistics and the scans' fp32 work make it somewhat more).
    """
    model = _meta_model(arch)
    d = arch.shape.d_model
    elements = 3 * d + 1
    for blk in model.layers:
        elements += 3 * d + 1 + _mixer_elements(blk.mixer, d, seq_len, batch)
    return elements * dtype_bytes + 4 * arch.shape.vocab_size + 8


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes per GPU during training; ``total`` is their sum."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    micro_batch: int

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def training_memory(
    arch: Architecture,
    params: int,
    *,
    micro_batch: int,
    seq_len: int,
    shards: int = 1,
    dtype_bytes: int = 2,
) -> TrainingMemory:
    """Per-GPU bytes of a training step: fp32 weights and gradients and AdamW's two fp32
    moments (each divided by ``shards`` under FSDP, 1 when replicated), and the activations
    of ``micro_batch`` sequences of ``seq_len``."""
    per = params / shards
    act = activation_bytes_per_token(
        arch, seq_len=seq_len, batch=micro_batch, dtype_bytes=dtype_bytes
    )
    return TrainingMemory(
        weights=4.0 * per,
        grads=4.0 * per,
        optimizer=8.0 * per,
        activations=act * micro_batch * seq_len,
        micro_batch=micro_batch,
    )
