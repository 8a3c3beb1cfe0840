"""Hugging Face integration: importing this module registers model_type "hcomposer".

After ``import hcomposer.hf``, ``AutoConfig`` and ``AutoModelForCausalLM`` load any
exported hcomposer folder without ``trust_remote_code``.
"""

from __future__ import annotations

import contextlib

from transformers import AutoConfig, AutoModelForCausalLM

from hcomposer.hf.configuration_hcomposer import HComposerConfig
from hcomposer.hf.modeling_hcomposer import (
    HComposerCache,
    HComposerForCausalLM,
    HComposerPreTrainedModel,
)

__all__ = ["HComposerConfig", "HComposerForCausalLM", "HComposerPreTrainedModel", "HComposerCache"]

# A second registration (module reloaded) raises ValueError: nothing to do then.
with contextlib.suppress(ValueError):
    AutoConfig.register("hcomposer", HComposerConfig)
with contextlib.suppress(ValueError):
    AutoModelForCausalLM.register(HComposerConfig, HComposerForCausalLM)
