"""Native ``transformers`` classes for hybrid patterns whose layer math matches exactly.

``BambaForCausalLM`` (transformers >= 5) is a stack of decoder layers, each

    x = x + mixer(input_layernorm(x));  x = x + SwiGLU(pre_ff_layernorm(x))

where the mixer is Mamba-2 or global attention. That is our pattern ``(XF)*n`` with every
``X`` in ``{A, S}``, term for term:

- Mamba-2 (``BambaMixer``): one ``in_proj`` split ``[z, xBC, dt]`` in our order, a depthwise
  causal conv with bias and SiLU, ``dt = softplus(dt + dt_bias)`` (its ``time_step_limit``
  left at ``(0, inf)``, a no-op clamp), ``A = -exp(A_log)``, ``n_groups`` shared B/C, the
  ``D * x`` skip, then the gated RMSNorm ``RMSNorm(y * silu(z))`` per group of
  ``intermediate / n_groups`` channels and ``out_proj``: our ``Mamba2`` exactly (the chunk
  size only reorders fp32 sums).
- Attention (``BambaAttention``): GQA with Llama's half-split RoPE. ``BambaConfig`` defaults
  to rotating half of each head (``partial_rotary_factor = 0.5``) for its checkpoints; we
  write ``partial_rotary_factor: 1.0`` into ``rope_parameters``, which it honours, so the
  whole head rotates as ours does.
- Norms are RMSNorm in fp32 with the shape's ``norm_eps``; the final norm and the (tied or
  untied) head are Llama's.

An all-``A`` pattern ``(AF)*n`` stays Llama (the more widely supported class), or the Qwen
class that holds its attention options: ``Qwen2ForCausalLM`` for biases on q/k/v
(``attn_bias``: Qwen2's attention has exactly those, no output bias), ``Qwen3ForCausalLM`` for
per-head q/k RMSNorm (``qk_norm``, Qwen3's ``q_norm``/``k_norm`` with ``attention_bias``
false). Both options together fit no stock class (Qwen3's ``attention_bias`` also puts one on
the output projection), nor does either fit Bamba: those go to the self-contained class. Why
the other hybrid classes of ``transformers`` do not fit is written down in ``docs/export.md``.
"""

from __future__ import annotations

from typing import Any

import torch

from hcomposer.architecture import Architecture
from hcomposer.primitive_specs import SPECS

__all__ = [
    "native_blocks",
    "FAMILIES",
    "decoder_family",
    "is_bamba_pattern",
    "bamba_config_kwargs",
    "decoder_config_kwargs",
    "native_model",
    "bamba_model",
    "to_bamba_state_dict",
]


def native_blocks(arch: Architecture, kind: str) -> bool:
    """True when the pattern is ``(XY)*n`` of single sublayers, every X a sequence mixer and
    every Y a feed-forward whose registry entry lists ``kind`` among its native exports: the
    decoder blocks of that Hugging Face class, one to one."""
    layers = arch.layers
    if not layers or len(layers) % 2 or any(len(s) != 1 for s in layers):
        return False
    for i, (tok,) in enumerate(layers):
        facts = SPECS[tok]
        if facts.mixer != (i % 2 == 0) or kind not in facts.native_export:
            return False
    return True


# (attn_bias, qk_norm) -> the stock decoder class holding that attention, by model_type.
FAMILIES: dict[tuple[bool, bool], str] = {
    (False, False): "llama",
    (True, False): "qwen2",
    (False, True): "qwen3",
}


def _plain_attention(arch: Architecture) -> bool:
    return not (arch.shape.attn_bias or arch.shape.qk_norm)


def decoder_family(arch: Architecture) -> str | None:
    """``llama``, ``qwen2`` or ``qwen3`` for ``(AF)*n`` whose attention options (``attn_bias``,
    ``qk_norm``) that class holds exactly; None for other patterns and for both options."""
    if not native_blocks(arch, "llama"):
        return None
    return FAMILIES.get((arch.shape.attn_bias, arch.shape.qk_norm))


def is_bamba_pattern(arch: Architecture) -> bool:
    """True for ``(XF)*n`` with every X in {A, S} and at least one S (all-A is a Llama), its
    attention without the Qwen options."""
    return (
        native_blocks(arch, "bamba") and not native_blocks(arch, "llama") and _plain_attention(arch)
    )


def decoder_config_kwargs(s, n_blocks: int) -> dict[str, Any]:
    """The ``transformers`` config fields every native decoder export shares (Llama, Bamba):
    widths, heads, vocabulary, norms and no biases, read from the shape ``s``."""
    return {
        "vocab_size": s.vocab_size,
        "hidden_size": s.d_model,
        "intermediate_size": s.ffn_dim,
        "num_hidden_layers": n_blocks,
        "num_attention_heads": s.n_heads,
        "num_key_value_heads": s.n_kv_heads,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": s.max_seq_len,
        "initializer_range": s.init_std,
        "rms_norm_eps": s.norm_eps,
        "tie_word_embeddings": s.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
    }


def bamba_config_kwargs(arch: Architecture) -> dict[str, Any]:
    """``BambaConfig`` fields for a ``(XF)*n`` pattern (see ``is_bamba_pattern``)."""
    s = arch.shape
    mixers = [arch.layers[i][0] for i in range(0, len(arch.layers), 2)]
    return {
        **decoder_config_kwargs(s, len(mixers)),
        "attn_layer_indices": [i for i, m in enumerate(mixers) if m == "A"],
        "mamba_n_heads": s.ssm_heads,
        "mamba_d_head": s.ssm_head_dim,
        "mamba_n_groups": s.ssm_groups,
        "mamba_d_state": s.ssm_state,
        "mamba_d_conv": s.ssm_conv,
        "mamba_expand": s.ssm_expand,
        "mamba_chunk_size": s.ssm_chunk,
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "time_step_limit": (0.0, float("inf")),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(s.rope_theta),
            "partial_rotary_factor": 1.0,
        },
        "z_loss_coefficient": 0.0,
    }


def to_bamba_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our ``(XF)*n`` weights under ``BambaForCausalLM``'s names."""
    sd = model.state_dict()
    out = {
        "model.embed_tokens.weight": sd["embed.weight"],
        "model.final_layernorm.weight": sd["norm.weight"],
    }
    for i in range(len(model.layers) // 2):
        m, f = f"layers.{2 * i}", f"layers.{2 * i + 1}"
        dst = f"model.layers.{i}"
        out[f"{dst}.input_layernorm.weight"] = sd[f"{m}.norm.weight"]
        out[f"{dst}.pre_ff_layernorm.weight"] = sd[f"{f}.norm.weight"]
        for p in ("gate_proj", "up_proj", "down_proj"):
            out[f"{dst}.feed_forward.{p}.weight"] = sd[f"{f}.mixer.ffn.{p}.weight"]
        if model.arch.layers[2 * i] == ("A",):
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[f"{dst}.self_attn.{p}.weight"] = sd[f"{m}.mixer.{p}.weight"]
        else:
            for p in (
                "in_proj.weight",
                "conv1d.weight",
                "conv1d.bias",
                "dt_bias",
                "A_log",
                "D",
                "norm.weight",
                "out_proj.weight",
            ):
                out[f"{dst}.mamba.{p}"] = sd[f"{m}.mixer.{p}"]
    if not model.arch.shape.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def bamba_model(model: torch.nn.Module, arch: Architecture, special: dict):
    """A ``BambaForCausalLM`` carrying ``model``'s weights (config fields from the shape)."""
    from transformers import BambaConfig, BambaForCausalLM

    config = BambaConfig(
        **bamba_config_kwargs(arch), bos_token_id=None, pad_token_id=None, **special
    )
    return native_model(BambaForCausalLM, config, to_bamba_state_dict(model), model, arch)


def native_model(cls, config, state: dict, model: torch.nn.Module, arch: Architecture):
    """A ``transformers`` model of class ``cls`` built from ``config``, in ``model``'s dtype,
    holding the weights ``state`` (its tied head left to ``tie_weights``), in eval mode."""
    config.architectures = [cls.__name__]
    hf = cls(config).to(next(model.parameters()).dtype)
    hf.load_state_dict(state, strict=not arch.shape.tie_embeddings)
    hf.tie_weights()
    return hf.eval()
