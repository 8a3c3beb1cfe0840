"""Load a teacher: a local Hugging Face folder of a Llama-family model, or an hcomposer run.

A Hugging Face folder is read through ``transformers`` (``AutoConfig`` and
``AutoModelForCausalLM.from_pretrained`` with ``use_safetensors=True``, local files only):
weights stored as pickles (``pytorch_model.bin``) are refused before anything is read. The
model becomes our ``(AF)*n`` ``HybridLM`` through the export's own mapping run backwards:

- the shape is solved from the config, then ``export.llama_config_kwargs`` of that shape must
  give back every field of the config (a field it cannot express is refused, by name);
- the weights: ``export.to_llama_state_dict(ours)`` names each of our tensors by its Llama name
  (the tensors share storage with our parameters), and each is filled from the Hugging Face
  tensor of that name. A Hugging Face tensor left over is refused.

Supported: ``LlamaForCausalLM`` (default RoPE, tied or untied head, any ``head_dim``),
``MistralForCausalLM`` without an active sliding window (the same decoder),
``Qwen2ForCausalLM`` (biases on q/k/v: the shape's ``attn_bias``) and ``Qwen3ForCausalLM``
(per-head q/k RMSNorm: ``qk_norm``), both with every layer on full attention. Refused with one
line: RoPE scaling of any type other than ``default`` (Llama-3's ``llama3``, ``yarn``...), a
sliding window shorter than the context on any layer (Mistral's ``sliding_window``, Qwen's
``use_sliding_window`` on the layers from ``max_window_layers`` on), Llama's attention or MLP
biases (they include the output projection), Qwen3's ``attention_bias``, activations other
than SiLU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hcomposer.architecture import Architecture
from hcomposer.data import HFTokenizer, Tokenizer
from hcomposer.errors import UserError
from hcomposer.export.folder import llama_config_kwargs, to_llama_state_dict
from hcomposer.model import HybridLM, build_model
from hcomposer.runs import RunDir
from hcomposer.shapes import Shape
from hcomposer.training.trainer import load_run

__all__ = [
    "Teacher",
    "load_teacher",
    "shape_from_config",
    "attention_layers",
    "conversion_fields",
    "for_conversion",
    "SUPPORTED",
]

# model_type -> why it is refused (None: supported, the Llama mapping holds).
SUPPORTED: dict[str, str | None] = {
    "llama": None,
    "mistral": None,
    "qwen2": None,
    "qwen3": None,
}
# model_type -> the attention options of its decoder (shape fields).
_OPTIONS = {"qwen2": {"attn_bias": True}, "qwen3": {"qk_norm": True}}


@dataclass
class Teacher:
    """A loaded teacher: our model (eval mode, fp32), its architecture and where it came from."""

    model: HybridLM
    arch: Architecture
    tokenizer: Tokenizer | None
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def attention_layers(self) -> list[int]:
        return attention_layers(self.arch)


def attention_layers(arch: Architecture) -> list[int]:
    """Sublayer indices of the global-attention sublayers (``A`` alone), in order."""
    return [i for i, layer in enumerate(arch.layers) if layer == ("A",)]


def load_teacher(path: str | Path) -> Teacher:
    """The teacher at ``path``: an hcomposer run folder or a Hugging Face model folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"teacher {str(path)!r} is not a folder; give a Hugging Face model folder or an "
            "hcomposer run folder"
        )
    if RunDir(path).is_run():
        model, arch, tokenizer, info = load_run(path)
        model = model.float().eval()
        # The S/D widths a conversion maps onto (the teacher's own layers keep theirs).
        arch = for_conversion(arch)
        model.arch = arch
        if not attention_layers(arch):
            raise UserError(f"teacher {str(path)!r} ({arch.pattern}) has no attention layer")
        source = {"kind": "run", "path": str(path), "step": info["step"]}
        return Teacher(model=model, arch=arch, tokenizer=tokenizer, source=source)
    if (path / "config.json").is_file():
        return _load_hf(path)
    raise UserError(
        f"teacher {str(path)!r} is neither a Hugging Face model folder (no config.json) nor an "
        "hcomposer run folder (no architecture.json)"
    )


def _load_hf(path: Path) -> Teacher:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"teacher {str(path)!r}: config.json cannot be read ({first})") from None
    _check_weights_files(path)
    arch = Architecture(
        pattern="AF" * _int(config, "num_hidden_layers"), shape=shape_from_config(config)
    )
    # transformers' loading bar would be a second line on stderr before any one-line error.
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        hf = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, use_safetensors=True, dtype=torch.float32
        )
    finally:
        if was:
            hf_logging.enable_progress_bar()
    model = build_model(arch, device="cpu")
    _fill_from_hf(model, hf.state_dict(), path)
    model.eval()
    tokenizer = HFTokenizer.from_file(path) if (path / "tokenizer.json").is_file() else None
    source = {"kind": "hf", "path": str(path), "model_type": config.model_type}
    return Teacher(model=model, arch=arch, tokenizer=tokenizer, source=source)


def _check_weights_files(path: Path) -> None:
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise UserError(
            f"teacher {str(path)!r} stores its weights as pickles ({pickles[0]}), which hcomposer "
            "never loads; save the model with safetensors (save_pretrained does by default)"
        )
    raise UserError(f"teacher {str(path)!r} holds no *.safetensors weights")


def _int(config, name: str) -> int:
    value = getattr(config, name, None)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"teacher config: {name} = {value!r} is not an integer")
    return value


def shape_from_config(config) -> Shape:
    """The shape of a Llama-family config; a feature the mapping cannot express is refused.

    The S and D widths of the shape are set to what a converted attention layer needs (see
    ``hcomposer.convert.mapping``): Mamba-2 heads of the attention's head width with one B/C
    group per query head, DeltaNet q/k and value heads as the query heads.
    """
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise UserError(
            f"teacher model type {kind!r} is not supported; supported: "
            f"{', '.join(k for k, v in SUPPORTED.items() if v is None)}"
        )
    if SUPPORTED[kind] is not None:
        raise UserError(f"teacher model type {kind!r} is not supported yet: {SUPPORTED[kind]}")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(
            f"teacher uses rope_type {rope_type!r} (rope scaling), which hcomposer's RoPE does "
            "not implement; only the default RoPE is supported"
        )
    _refuse_window(config)
    heads, kv = _int(config, "num_attention_heads"), _int(config, "num_key_value_heads")
    d = _int(config, "hidden_size")
    head_dim = getattr(config, "head_dim", None) or d // heads
    shape = _shape(config, d, heads, kv, head_dim, float(rope.get("rope_theta", 10000.0)))
    _check_round_trip(
        config, Architecture(pattern="AF" * _int(config, "num_hidden_layers"), shape=shape)
    )
    return shape


def _refuse_window(config) -> None:
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", None) is False:
        return
    types = getattr(config, "layer_types", None)
    sliding = [i for i, t in enumerate(types or []) if t != "full_attention"]
    if types is not None and not sliding:
        return  # Qwen: use_sliding_window set, but max_window_layers covers every layer
    if window < _int(config, "max_position_embeddings"):
        where = f" on layers {sliding[0]}..{sliding[-1]}" if sliding else ""
        raise UserError(
            f"teacher attends within a sliding window of {window} tokens{where} (shorter than "
            f"its {config.max_position_embeddings}-token context); only full attention is "
            "supported"
        )


def conversion_fields(d_model: int, n_heads: int, head_dim: int) -> dict[str, int]:
    """S and D widths that a converted attention layer maps onto one to one (see ``mapping``).

    S: heads of the attention's head width, one B/C group per query head, state = head width;
    its inner width is ``ssm_expand * d_model`` (an integer multiple), so when the attention's
    ``n_heads * head_dim`` is not one, the extra channels start fresh. D: q/k heads and value
    heads = the query heads, both of the attention's head width.
    """
    inner = n_heads * head_dim
    expand = max(1, -(-inner // d_model))
    fits = (expand * d_model) % head_dim == 0 and (expand * d_model // head_dim) % n_heads == 0
    return {
        "ssm_expand": expand,
        "ssm_head_dim": head_dim if fits else expand * d_model,
        "ssm_state": head_dim,
        "ssm_groups": n_heads if fits else 1,
        "dn_heads": n_heads,
        "dn_head_dim": head_dim,
        "dn_v_heads": n_heads,
        "dn_v_head_dim": head_dim,
    }


def for_conversion(arch: Architecture) -> Architecture:
    """``arch`` with the S/D widths of ``conversion_fields``, for primitives it does not use
    (a teacher's own S or D layers keep their widths)."""
    s = arch.shape
    fields = conversion_fields(s.d_model, s.n_heads, s.head_dim)
    used = {t for layer in arch.layers for t in layer}
    keep = {k: v for k, v in fields.items() if not (k.startswith("ssm") and "S" in used)}
    keep = {k: v for k, v in keep.items() if not (k.startswith("dn") and "D" in used)}
    return arch.with_shape(s.replace(**keep))


def _shape(config, d: int, heads: int, kv: int, head_dim: int, theta: float) -> Shape:
    try:
        return Shape(
            name=f"teacher-{config.model_type}",
            d_model=d,
            n_heads=heads,
            n_kv_heads=kv,
            head_dim=head_dim,
            ffn_dim=_int(config, "intermediate_size"),
            vocab_size=_int(config, "vocab_size"),
            max_seq_len=_int(config, "max_position_embeddings"),
            n_layers=2 * _int(config, "num_hidden_layers"),
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            rope_theta=theta,
            norm_eps=float(config.rms_norm_eps),
            init_std=float(getattr(config, "initializer_range", 0.02)),
            window=min(4096, _int(config, "max_position_embeddings")),
            **_OPTIONS.get(config.model_type, {}),
            **conversion_fields(d, heads, head_dim),
        )
    except UserError as e:
        raise UserError(f"teacher config does not fit an hcomposer shape: {e}") from None


def _check_round_trip(config, arch: Architecture) -> None:
    """Every field the export writes must read back as the config's own value."""
    for key, want in llama_config_kwargs(arch).items():
        if key in ("rope_parameters", "use_sliding_window"):
            continue  # checked above (rope type, windows) and taken as is (theta)
        got = getattr(config, key, None)
        if key in ("attention_bias", "mlp_bias") and got is None:
            got = False
        if key == "head_dim" and got is None:
            got = want if arch.shape.d_model // arch.shape.n_heads == want else None
        same = abs(got - want) <= 1e-12 * abs(want) if isinstance(want, float) else got == want
        if not same:
            raise UserError(
                f"teacher config: {key} = {got!r} is not supported (the {config.model_type} "
                f"mapping needs {want!r})"
            )


@torch.no_grad()
def _fill_from_hf(model: HybridLM, hf_state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy a Llama state dict into ``model`` under the export's names (shared storage)."""
    targets = to_llama_state_dict(model)
    tied = model.arch.shape.tie_embeddings
    extra = [
        k
        for k in hf_state
        if k not in targets and not (tied and k == "lm_head.weight") and "rotary_emb" not in k
    ]
    if extra:
        raise UserError(
            f"teacher {str(path)!r} has weights the mapping does not hold (e.g. {extra[0]})"
        )
    for name, ours in targets.items():
        theirs = hf_state.get(name)
        if theirs is None or theirs.shape != ours.shape:
            got = None if theirs is None else tuple(theirs.shape)
            raise UserError(
                f"teacher {str(path)!r}: weight {name} is {got}, expected {tuple(ours.shape)}"
            )
        ours.copy_(theirs.to(ours.dtype))
