"""Export a model as a Hugging Face folder that ``AutoModelForCausalLM`` loads.

Three kinds of folder (``kind="auto"`` picks the first that fits):

- ``llama``: a plain transformer pattern (``"AF" * n``) becomes a native
  ``LlamaForCausalLM`` folder, loadable anywhere without remote code. Our RoPE
  uses Llama's half-split convention and our RMSNorm matches Llama's, so the
  weights map one to one (only the names change).
- ``qwen2`` / ``qwen3``: the same stack with biases on q/k/v (shape ``attn_bias``) or
  per-head q/k RMSNorm (``qk_norm``) becomes a native ``Qwen2ForCausalLM`` /
  ``Qwen3ForCausalLM`` (the Llama names, plus ``q_proj.bias``... or ``q_norm``/``k_norm``).
- ``bamba``: ``(XF)*n`` with X in {A, S} becomes a native ``BambaForCausalLM``
  (``export.native``): stock ``transformers``, no remote code.
- ``hcomposer``: every other pattern becomes ``HComposerForCausalLM``
  (``model_type`` "hcomposer"). ``import hcomposer.hf`` registers it with the
  Auto classes; the folder also carries self-contained remote code generated from
  the package's own modules (``export.remote``) with an ``auto_map``, so
  ``trust_remote_code=True`` loads it with only ``torch`` and ``transformers``.

Every folder gets ``tokenizer.json`` + ``tokenizer_config.json`` (the byte-level
tokenizer is rebuilt with ``tokenizers`` so that it yields our exact ids),
``hcomposer_architecture.json``, ``hcomposer_export.json`` (provenance) and a
``README.md`` model card (``model_card``). The folder is written to a temporary
sibling and renamed into place, so a failed export leaves nothing behind and an
existing target is never touched; its files get the user's usual permissions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from hcomposer.architecture import Architecture
from hcomposer.errors import UserError
from hcomposer.evaluation.suite import eval_markdown, load_eval_results
from hcomposer.export.model_card import model_card
from hcomposer.export.native import (
    bamba_model,
    decoder_config_kwargs,
    decoder_family,
    is_bamba_pattern,
    native_blocks,
    native_model,
)
from hcomposer.export.remote import write_remote_code
from hcomposer.hf import HComposerConfig, HComposerForCausalLM
from hcomposer.io import atomic_write_json, atomic_write_text, run_metadata
from hcomposer.training.trainer import load_run

__all__ = [
    "KINDS",
    "export_model",
    "resolve_kind",
    "export_run",
    "is_llama_pattern",
    "llama_config_kwargs",
    "to_llama_state_dict",
    "byte_tokenizer_json",
]

EOS_TOKEN = "<|endoftext|>"

KINDS = ("auto", "llama", "qwen2", "qwen3", "bamba", "hcomposer")
# The native decoder classes of (AF)*n by model_type (export.native.decoder_family).
_DECODERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def is_llama_pattern(arch: Architecture) -> bool:
    """True when the pattern is ``(AF)*n``: exactly a Llama decoder stack."""
    return native_blocks(arch, "llama")


def llama_config_kwargs(arch: Architecture) -> dict[str, Any]:
    """The config fields (transformers 5 names) of the native decoder class of an ``(AF)*n``
    architecture: ``LlamaConfig``'s, or ``Qwen2Config``'s / ``Qwen3Config``'s for the shape's
    attention options (``export.native.decoder_family``)."""
    s = arch.shape
    family = decoder_family(arch) or "llama"
    out = {
        **decoder_config_kwargs(s, arch.n_sublayers // 2),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(s.rope_theta)},
    }
    if family != "llama":
        # Qwen2 has q/k/v biases built in and no bias options; Qwen3 no MLP bias option.
        out.pop("mlp_bias")
        out["use_sliding_window"] = False
        if family == "qwen2":
            out.pop("attention_bias")
    return out


def to_llama_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our ``(AF)*n`` weights under ``LlamaForCausalLM``'s names (with the attention options,
    the q/k/v biases and q/k norms under Qwen2's and Qwen3's: ``self_attn.q_proj.bias``,
    ``self_attn.q_norm.weight``...)."""
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    n = len(model.layers) // 2
    for i in range(n):
        a, f = f"layers.{2 * i}", f"layers.{2 * i + 1}"
        dst = f"model.layers.{i}"
        out[f"{dst}.input_layernorm.weight"] = sd[f"{a}.norm.weight"]
        mixer = f"{a}.mixer."
        for name in sd:
            if name.startswith(mixer):
                out[f"{dst}.self_attn.{name.removeprefix(mixer)}"] = sd[name]
        out[f"{dst}.post_attention_layernorm.weight"] = sd[f"{f}.norm.weight"]
        for p in ("gate_proj", "up_proj", "down_proj"):
            out[f"{dst}.mlp.{p}.weight"] = sd[f"{f}.mixer.ffn.{p}.weight"]
    if not model.arch.shape.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """The printable-character alias of every byte used by byte-level BPE (GPT-2's table).

    Printable Latin-1 bytes stand for themselves; the others are moved to code
    points from 256 upwards, in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _probe_byte_offset(tokenizer) -> int:
    """The constant ``id - byte`` of a byte-level tokenizer, checked on every probeable byte."""
    first = tokenizer.encode("a")
    if len(first) != 1:
        raise UserError(
            f"tokenizer {tokenizer.name!r} encodes 'a' as {first}: not a plain byte tokenizer, "
            "and it has no tokenizer.json to export"
        )
    offset = first[0] - ord("a")
    probes = [chr(c) for c in range(128)] + ["é", "€", "😀", "ÿ", "\u07ff", "\uffef"]
    for text in probes:
        want = [b + offset for b in text.encode("utf-8")]
        got = tokenizer.encode(text)
        if got != want:
            raise UserError(
                f"tokenizer {tokenizer.name!r} maps {text!r} to {got}, not bytes+{offset}: "
                "cannot rebuild it as tokenizer.json"
            )
    return offset


def byte_tokenizer_json(tokenizer, vocab_size: int) -> str:
    """A ``tokenizer.json`` (tokenizers library) that reproduces a byte tokenizer's ids.

    Byte-level pre-tokenisation without regex splitting and a BPE model with no
    merges: every byte becomes exactly one token, id = byte + offset. Ids outside
    the byte range (EOS and any other specials) become added special tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    offset = _probe_byte_offset(tokenizer)
    alias = _bytes_to_unicode()
    vocab = {alias[b]: b + offset for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    byte_ids = set(vocab.values())
    eos = getattr(tokenizer, "eos_id", None)
    specials = []
    for i in range(vocab_size):
        if i in byte_ids:
            continue
        name = EOS_TOKEN if i == eos else f"<|special_{i}|>"
        specials.append((i, name))
    # add_special_tokens appends at the next free id, so add them in id order
    # after padding the vocabulary to each one's id with placeholder specials.
    for i, name in specials:
        if tok.get_vocab_size(with_added_tokens=True) != i:
            raise UserError(
                f"tokenizer {tokenizer.name!r}: special id {i} is not contiguous with the byte ids"
            )
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    return tok.to_str()


def _write_tokenizer(tokenizer, arch: Architecture, out: Path) -> dict[str, Any]:
    """tokenizer.json + tokenizer_config.json; returns the special-token ids for the config."""
    with tempfile.TemporaryDirectory() as tmp:
        saved = None
        if hasattr(tokenizer, "save"):
            tokenizer.save(tmp)
            found = list(Path(tmp).rglob("tokenizer.json"))
            saved = found[0] if found else None
        if saved is not None:
            shutil.copyfile(saved, out / "tokenizer.json")
        else:
            atomic_write_text(
                out / "tokenizer.json", byte_tokenizer_json(tokenizer, arch.shape.vocab_size)
            )
    data = json.loads((out / "tokenizer.json").read_text())
    eos_id = getattr(tokenizer, "eos_id", None)
    eos_token = None
    for added in data.get("added_tokens", []):
        if added["id"] == eos_id:
            eos_token = added["content"]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": arch.shape.max_seq_len,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    if eos_token is not None:
        config["eos_token"] = eos_token
    atomic_write_json(out / "tokenizer_config.json", config)
    return {"eos_token_id": eos_id if eos_token is not None else None}


def _check_target(out_dir: Path) -> None:
    if out_dir.exists():
        raise UserError(
            f"export target {str(out_dir)!r} already exists; choose a new --out folder "
            "(nothing was overwritten)"
        )
    if out_dir.parent.exists() and not out_dir.parent.is_dir():
        raise UserError(f"export target's parent {str(out_dir.parent)!r} is not a folder")


def export_model(
    model: torch.nn.Module,
    arch: Architecture,
    tokenizer,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    kind: str = "auto",
    argv: list[str] | None = None,
    run_info: dict[str, Any] | None = None,
    eval_markdown: str | None = None,
) -> dict[str, Any]:
    """Write ``model`` as a Hugging Face folder at ``out_dir`` (which must not exist).

    ``kind``: ``auto`` (llama for ``(AF)*n``, bamba for ``(XF)*n`` with X in {A, S},
    else hcomposer), ``llama``, ``bamba`` or ``hcomposer``. ``run_info`` and
    ``eval_markdown`` feed the model card. Returns a summary dict (kind, path, files,
    parameters).
    """
    out_dir = Path(out_dir)
    _check_target(out_dir)
    kind = resolve_kind(arch, kind)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        model = model.to("cpu")
        if dtype is not None:
            model = model.to(dtype)
        special = _write_tokenizer(tokenizer, arch, tmp)
        if kind in _DECODERS:
            hf_model = _decoder_model(model, arch, special, kind)
        elif kind == "bamba":
            hf_model = bamba_model(model, arch, special)
        else:
            hf_model = _hcomposer_model(model, arch, special)
        hf_model.save_pretrained(tmp)
        if kind == "hcomposer":
            write_remote_code(tmp)
        atomic_write_text(tmp / "hcomposer_architecture.json", arch.to_json() + "\n")
        summary = {
            "kind": kind,
            "path": str(out_dir),
            "pattern": arch.pattern,
            "shape": arch.shape.name,
            "params": sum(p.numel() for p in hf_model.parameters()),
            "dtype": str(next(hf_model.parameters()).dtype).replace("torch.", ""),
            "model_class": type(hf_model).__name__,
        }
        atomic_write_json(tmp / "hcomposer_export.json", {**summary, **run_metadata(argv)})
        card = model_card(arch, summary, info=run_info, eval_markdown=eval_markdown)
        atomic_write_text(tmp / "README.md", card)
        summary["files"] = sorted(p.name for p in tmp.iterdir())
        _usual_permissions(tmp)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def resolve_kind(arch: Architecture, kind: str) -> str:
    """The folder kind for ``arch``: ``auto`` resolved, an explicit kind checked against it."""
    if kind not in KINDS:
        raise UserError(f"unknown export kind {kind!r}; valid: {', '.join(KINDS)}")
    family = decoder_family(arch)
    if kind == "auto":
        if family is not None:
            return family
        return "bamba" if is_bamba_pattern(arch) else "hcomposer"
    if kind in _DECODERS and not is_llama_pattern(arch):
        raise UserError(f"pattern {arch.pattern!r} is not (AF)*n: --kind {kind} does not fit it")
    if kind in _DECODERS and kind != family:
        raise UserError(f"--kind {kind} does not fit {_options(arch)}; use --kind auto")
    if kind == "bamba" and not (is_bamba_pattern(arch) or family == "llama"):
        if is_llama_pattern(arch) or native_blocks(arch, "bamba"):
            raise UserError(f"--kind bamba does not fit {_options(arch)}; use --kind auto")
        raise UserError(
            f"pattern {arch.pattern!r} is not (XF)*n with X in A, S: --kind bamba does not fit it"
        )
    return kind


def _options(arch: Architecture) -> str:
    """The attention options of ``arch``'s shape, in words."""
    s = arch.shape
    names = [n for n, on in (("attn_bias", s.attn_bias), ("qk_norm", s.qk_norm)) if on]
    return "attention with " + " and ".join(names) if names else "plain attention"


def _usual_permissions(root: Path) -> None:
    """Folders and files as the user's umask makes them (mkdtemp/mkstemp give 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _decoder_model(model, arch: Architecture, special: dict, kind: str):
    import transformers

    config_name, model_name = _DECODERS[kind]
    config = getattr(transformers, config_name)(
        **llama_config_kwargs(arch), bos_token_id=None, **special
    )
    cls = getattr(transformers, model_name)
    return native_model(cls, config, to_llama_state_dict(model), model, arch)


def _hcomposer_model(model, arch: Architecture, special: dict):
    config = HComposerConfig(architecture=arch.to_dict(), bos_token_id=None, **special)
    config.architectures = ["HComposerForCausalLM"]
    config.auto_map = {
        "AutoConfig": "configuration_hcomposer.HComposerConfig",
        "AutoModelForCausalLM": "modeling_hcomposer.HComposerForCausalLM",
    }
    dtype = next(model.parameters()).dtype
    hf = HComposerForCausalLM(config).to(dtype)
    hf.model.load_state_dict(model.state_dict())
    return hf.eval()


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    kind="auto",
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Export a training run folder's latest checkpoint (``hcomposer export DIR --out HF``)."""
    _check_target(Path(out_dir))
    model, arch, tokenizer, info = load_run(run_dir)
    resolve_kind(arch, kind)
    results = load_eval_results(run_dir)
    return export_model(
        model,
        arch,
        tokenizer,
        out_dir,
        dtype=dtype,
        kind=kind,
        argv=argv,
        run_info=info,
        eval_markdown=eval_markdown(results) if results.get("parts") else None,
    )
