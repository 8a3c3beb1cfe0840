"""Cost accounting on the meta device: parameters, FLOPs, cache bytes.

Parameters are counted from the modules themselves (built on the meta device,
no memory); FLOPs are 2 x (active matmul parameters) per token plus each
primitive's own non-parametric work (attention scores, SSM scan), with the
output head's matmul included and the input embedding (a lookup) excluded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hcomposer.architecture import Architecture
from hcomposer.model import HybridLM, build_model
from hcomposer.primitives import sublayer_param_count

__all__ = ["Costs", "count_costs", "estimate_memory", "meta_model", "params_from_shape"]


@dataclass(frozen=True)
class Costs:
    pattern: str
    shape: str
    n_sublayers: int
    params_total: int
    params_active: int
    params_embedding: int
    params_non_embedding: int
    flops_per_token: float
    seq_len: int
    kv_bytes_per_token: int
    state_bytes: int
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _unique_params(module) -> int:
    seen = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def meta_model(arch: Architecture) -> tuple[HybridLM, int]:
    """``arch``'s model built on the meta device (its exact structure: every module, name
    and shape, no memory allocated, nothing initialised) and its exact parameter count (a
    tied embedding and head counted once)."""
    model = build_model(arch, device="meta")
    return model, _unique_params(model)


def count_costs(arch: Architecture, seq_len: int | None = None, dtype_bytes: int = 2) -> Costs:
    """All costs of ``arch`` at ``seq_len`` (default: the shape's max_seq_len)."""
    s = arch.shape
    seq_len = seq_len or s.max_seq_len
    model, total = meta_model(arch)
    embedding = s.vocab_size * s.d_model * (1 if s.tie_embeddings else 2)
    inactive = 0
    extra = 0.0
    kv = 0
    state = 0
    for blk in model.layers:
        prim = blk.mixer
        inactive += getattr(prim, "inactive_params", lambda: 0)()
        extra += prim.extra_flops_per_token(seq_len)
        kv += prim.kv_bytes_per_token(dtype_bytes)
        state += prim.state_bytes(dtype_bytes)
    active = total - inactive
    # The input embedding is a lookup; the head is a d_model x vocab matmul either way.
    matmul = active - s.vocab_size * s.d_model * (0 if s.tie_embeddings else 1)
    flops = 2.0 * matmul + extra
    return Costs(
        pattern=arch.pattern,
        shape=s.name,
        n_sublayers=arch.n_sublayers,
        params_total=total,
        params_active=active,
        params_embedding=embedding,
        params_non_embedding=total - embedding,
        flops_per_token=flops,
        seq_len=seq_len,
        kv_bytes_per_token=kv,
        state_bytes=state,
        counts=arch.counts(),
    )


def params_from_shape(arch: Architecture) -> int:
    """Exact parameters from the shape alone (no model is built): the embedding (and an
    untied head), each sublayer's norm and primitive (each primitive's own ``param_count``),
    and the final norm. Equal to ``count_costs(arch).params_total`` (tested)."""
    s = arch.shape
    body = sum(s.d_model + sublayer_param_count(sub, s) for sub in arch.layers)
    return body + s.d_model + s.vocab_size * s.d_model * (1 if s.tie_embeddings else 2)


def estimate_memory(
    arch: Architecture, *, batch: int, seq_len: int, training: bool = False
) -> float:
    """Rough peak bytes of one forward (or training step) of ``batch x seq_len`` tokens in fp32.

    Only used to refuse requests no machine here could hold (``hcomposer.guards``), so it is
    computed from the shape alone, without building a model: weights (x4 when training:
    gradients and AdamW's two moments), the widest activation per sublayer (all sublayers
    kept for backward when training), the logits and their gradient, and the keys and
    values of the global-attention sublayers.
    """
    s = arch.shape
    tokens = batch * seq_len
    weights = params_from_shape(arch) * 4 * (4 if training else 1)
    widest = max(s.d_model * 4, s.ffn_dim * 3, s.ssm_expand * s.d_model * 2)
    activations = tokens * widest * 4 * (arch.n_sublayers if training else 2)
    logits = tokens * s.vocab_size * 4 * 2
    n_attention = sum(tok == "A" for sub in arch.layers for tok in sub)
    cache = tokens * n_attention * 2 * s.n_kv_heads * s.head_dim * 4
    return float(weights + activations + logits + cache)
