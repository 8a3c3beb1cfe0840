"""``HComposerForCausalLM``: any hcomposer pattern as a Hugging Face causal LM.

The wrapper holds the framework's own ``HybridLM`` under ``model`` (so the weight
names are ``model.<our names>``) and adds what ``transformers`` expects: a
config class, ``CausalLMOutputWithPast`` outputs, a loss from ``labels``, and
incremental decoding for ``generate``.

Caching: ``past_key_values`` is an ``HComposerCache`` wrapping our
``ModelCache`` (KV caches for A, ring buffers for W, recurrent state for S). It
is not a ``transformers.Cache``: the hybrid state does not fit Hugging Face's
per-layer key/value layout, so the model opts out of the default dynamic cache
and builds its own on the first forward. Global-attention caches grow by
doubling when a sequence outgrows them, so ``generate`` needs no length up front.

Padding is not supported: an ``attention_mask`` with zeros raises (our
primitives have no padding mask; batch prompts of equal length instead).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from hcomposer.architecture import Architecture
from hcomposer.hf.configuration_hcomposer import HComposerConfig
from hcomposer.model import HybridLM, ModelCache, init_module, lm_loss
from hcomposer.primitives.attention import KVCache

__all__ = ["HComposerCache", "HComposerForCausalLM", "HComposerPreTrainedModel"]


class HComposerCache:
    """Decoding state for ``generate``: our ModelCache plus growth of global KV caches."""

    def __init__(self, model: HybridLM, batch_size: int, capacity: int):
        self.inner: ModelCache = model.init_cache(batch_size, capacity)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.inner.pos

    def ensure(self, new_tokens: int) -> None:
        """Grow every global KV cache (doubling) so ``new_tokens`` more positions fit."""
        need = self.inner.pos + new_tokens
        if need <= self.inner.max_len:
            return
        cap = max(need, 2 * self.inner.max_len)
        for kv in _kv_caches(self.inner.layers):
            pad = cap - kv.k.shape[2]
            kv.k = F.pad(kv.k, (0, 0, 0, pad))
            kv.v = F.pad(kv.v, (0, 0, 0, pad))
        self.inner.max_len = cap


def _kv_caches(obj: Any):
    if isinstance(obj, KVCache):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _kv_caches(o)


class HComposerPreTrainedModel(PreTrainedModel):
    config_class = HComposerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Our state is not per-layer keys/values; forward() builds an HComposerCache.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # HybridLM's scheme; parameters already loaded from a checkpoint carry
        # _is_hf_initialized and are left alone.
        params = list(module.parameters(recurse=False))
        if params and all(getattr(p, "_is_hf_initialized", False) for p in params):
            return
        init_module(module, Architecture.from_dict(self.config.architecture))


class HComposerForCausalLM(HComposerPreTrainedModel, GenerationMixin):
    """Causal LM over ``HybridLM``; logits equal the framework's for the same weights."""

    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: HComposerConfig):
        super().__init__(config)
        if config.architecture is None:
            raise ValueError("HComposerConfig.architecture is required (Architecture.to_dict())")
        self.model = HybridLM(Architecture.from_dict(config.architecture))
        self.post_init()

    @property
    def arch(self) -> Architecture:
        return self.model.arch

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.lm_head = value

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: HComposerCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # With a cache only the tokens it has not seen are fed; without, the whole prefix.
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.get_seq_length() :]
        return {
            "input_ids": input_ids,
            "past_key_values": past_key_values,
            "attention_mask": attention_mask,
            "use_cache": use_cache,
        }

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: HComposerCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        if input_ids is None:
            raise ValueError("HComposerForCausalLM needs input_ids (no inputs_embeds)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError(
                "padding is not supported by hcomposer models: pass prompts of equal length "
                "without padding (attention_mask must be all ones)"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if labels is not None:
            use_cache = False
        cache = past_key_values if use_cache else None
        if use_cache and cache is None:
            B, T = input_ids.shape
            cache = HComposerCache(self.model, B, capacity=max(T + 64, 2 * T))
        if cache is not None:
            cache.ensure(input_ids.shape[1])
        hidden = self.model.hidden_states(input_ids, cache=None if cache is None else cache.inner)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.model.lm_head(hidden)
        loss = None
        if labels is not None:
            # Hugging Face convention: labels are the inputs, shifted here.
            loss = lm_loss(logits[:, :-1], labels[:, 1:])
        if return_dict is False:
            out = (logits, cache)
            return (loss, *out) if loss is not None else out
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
