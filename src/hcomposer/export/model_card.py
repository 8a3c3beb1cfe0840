"""The ``README.md`` model card of an exported folder (Hugging Face Hub format).

YAML metadata (``library_name``, ``pipeline_tag``, ``tags``, ``base_model`` none) between
``---`` lines, then Markdown: the pattern and its shape, parameter counts from the accounting,
the training data and tokens of the run, the stored evaluation results (``hcomposer eval``)
when there are any, and how to load the folder. ``huggingface_hub.ModelCard`` parses it (the
tests check that).
"""

from __future__ import annotations

import json
from typing import Any

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture

__all__ = ["model_card"]

_LOAD = {
    "llama": "a native `LlamaForCausalLM`: stock `transformers`, no remote code",
    "qwen2": "a native `Qwen2ForCausalLM`: stock `transformers`, no remote code",
    "qwen3": "a native `Qwen3ForCausalLM`: stock `transformers`, no remote code",
    "bamba": "a native `BambaForCausalLM`: stock `transformers` (5.x), no remote code",
    "hcomposer": (
        "`HComposerForCausalLM`, shipped in this folder as self-contained remote code that "
        "needs only `torch` and `transformers`: load with `trust_remote_code=True`"
    ),
}


def _yaml_list(name: str, items: list[str]) -> list[str]:
    return [f"{name}:"] + [f"- {json.dumps(i)}" for i in items]


def _metadata(arch: Architecture, kind: str) -> str:
    tags = ["hcomposer", "hybrid", f"pattern-{arch.pattern}"[:100]]
    if any("S" in layer for layer in arch.layers):
        tags.append("mamba2")
    if any("E" in layer for layer in arch.layers):
        tags.append("moe")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    lines += _yaml_list("tags", tags)
    if kind == "hcomposer":
        lines.append("custom_code: true")
    lines.append("---")
    return "\n".join(lines)


def _shape_table(arch: Architecture) -> str:
    s = arch.shape.to_dict()
    rows = ["| field | value |", "|---|---|"]
    rows += [f"| `{k}` | {v} |" for k, v in s.items() if k != "name"]
    return "\n".join(rows)


def _training(info: dict[str, Any] | None) -> str:
    if not info:
        return "Not recorded: the model was exported from Python, not from a run folder."
    run = info.get("config") or {}
    cfg = run.get("train", run)
    dataset = run.get("dataset") or {}
    source = (dataset.get("source") or {}).get("spec") or cfg.get("data")
    data = f"`{source}`" if source else "the embedded sample corpus (Jane Austen's novels)"
    tokenizer = (dataset.get("tokenizer") or {}).get("name") or cfg.get("tokenizer", "byte")
    lines = [f"- data: {data}, tokenizer `{tokenizer}`"]
    counts = dataset.get("tokens") or {}
    if counts:
        lines.append(
            f"- dataset: {counts.get('train', 0):,} training and {counts.get('val', 0):,} "
            "validation tokens"
        )
    lines.append(
        f"- tokens trained: {int(info.get('tokens') or 0):,} in {int(info.get('step') or 0):,} "
        "optimiser steps"
    )
    keys = ("batch_size", "seq_len", "lr", "schedule", "weight_decay", "dtype", "seed")
    known = [f"{k}={cfg[k]}" for k in keys if k in cfg]
    if known:
        lines.append("- settings: " + ", ".join(known))
    summary = info.get("summary") or {}
    for key, what in (("val_loss", "validation loss"), ("loss", "training loss")):
        if summary.get(key) is not None:
            lines.append(f"- {what} at the end of training: {summary[key]:.4f}")
    return "\n".join(lines)


def _demote(markdown: str) -> str:
    """Headings one level down, so stored results sit under the card's own section."""
    return "\n".join("#" + ln if ln.startswith("#") else ln for ln in markdown.strip().splitlines())


def model_card(
    arch: Architecture,
    export: dict[str, Any],
    *,
    info: dict[str, Any] | None = None,
    eval_markdown: str | None = None,
) -> str:
    """The card's text. ``export``: the export summary; ``info``: ``load_run``'s run info."""
    kind = export["kind"]
    costs = count_costs(arch)
    remote = ", trust_remote_code=True" if kind == "hcomposer" else ""
    body = f"""
# {arch.pattern} ({arch.shape.name} shape)

A hybrid language model composed and trained with
hcomposer, one character per residual sublayer
(`A` attention, `W` sliding-window attention, `F` SwiGLU MLP, `E` mixture of experts,
`S` Mamba-2; `[X|Y]` runs mixers in parallel). This folder is {_LOAD[kind]}.

- pattern: `{arch.pattern}` ({arch.n_sublayers} sublayers)
- class: `{export["model_class"]}`, weights in `{export["dtype"]}`
- parameters: {costs.params_total:,} total, {costs.params_active:,} active per token,
  {costs.params_non_embedding:,} without the embedding
- KV cache: {costs.kv_bytes_per_token:,} bytes per token; recurrent state:
  {costs.state_bytes:,} bytes per sequence (bf16)

## Shape

{_shape_table(arch)}

## Training

{_training(info)}

## Evaluation

{_demote(eval_markdown) if eval_markdown else "No stored results (`hcomposer eval RUN` adds them)."}

## How to load

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("PATH")
model = AutoModelForCausalLM.from_pretrained("PATH"{remote}).eval()
ids = tok("It is a truth universally acknowledged", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))
```

Its logits equal hcomposer's for the same weights (fp32, within 1e-4). Padding is not
supported by hcomposer's own class: batch prompts of equal length.
"""
    return _metadata(arch, kind) + "\n" + body
