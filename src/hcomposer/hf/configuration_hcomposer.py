"""``HComposerConfig``: a Hugging Face config that carries an hcomposer Architecture.

The architecture (pattern + shape, ``Architecture.to_dict()``) is stored whole in
``config.json`` under ``architecture``; the usual Hugging Face fields
(``vocab_size``, ``hidden_size``, ...) are derived from it so that generic tools
that read them (generation, pipelines, lm-eval's HF backend) see true values.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from hcomposer.pattern import parse_pattern

__all__ = ["HComposerConfig"]


class HComposerConfig(PretrainedConfig):
    """Config of an hcomposer hybrid LM; ``architecture`` is ``Architecture.to_dict()``."""

    model_type = "hcomposer"
    keys_to_ignore_at_inference = ["past_key_values"]

    architecture: dict | None = None
    vocab_size: int = 256
    hidden_size: int = 64
    num_hidden_layers: int = 1
    num_attention_heads: int = 1
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if self.architecture is not None:
            shape = self.architecture["shape"]
            self.vocab_size = int(shape["vocab_size"])
            self.hidden_size = int(shape["d_model"])
            self.num_attention_heads = int(shape["n_heads"])
            self.max_position_embeddings = int(shape["max_seq_len"])
            self.tie_word_embeddings = bool(shape.get("tie_embeddings", True))
            self.num_hidden_layers = len(parse_pattern(self.architecture["pattern"]))
        super().__post_init__(**kwargs)

    @property
    def pattern(self) -> str | None:
        return None if self.architecture is None else self.architecture["pattern"]
