"""Export: a trained model as a Hugging Face folder (``folder``), through a native class where
one fits (Llama in ``folder``, Bamba in ``native``), else with self-contained remote code
(``remote``); every folder gets a model card (``model_card``)."""

from hcomposer.export.folder import (
    KINDS,
    byte_tokenizer_json,
    export_model,
    export_run,
    is_llama_pattern,
    llama_config_kwargs,
    resolve_kind,
    to_llama_state_dict,
)

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
