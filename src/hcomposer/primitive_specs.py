"""What each primitive is, declared once as plain data; its behaviour is in its own file.

Every part of the package that needs to know about primitives reads this registry: the
pattern language (tokens, which may be parallel branches, Megatron letters), the architecture
check (what a parallel group divides among its branches), the primitives package (where each
class lives), the reports (colours) and the export (which native Hugging Face classes hold
it). Costs are the class's own: ``param_count``, ``extra_flops_per_token``,
``kv_bytes_per_token`` and ``state_bytes`` (``hcomposer.primitives.base.Primitive``).

Adding a primitive is one file (its class) plus one :func:`register` call (or one entry in
:data:`SPECS` below for the built-in ones); ``tests/test_primitive_contract.py`` then holds it
to the contract, and registers a toy primitive to show that nothing else needs changing.

This module imports nothing heavy: ``hcomposer.pattern`` (and so ``hcomposer --help``) reads
it without loading torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass

from hcomposer.errors import PatternError

__all__ = [
    "PrimitiveSpec",
    "SPECS",
    "register",
    "unregister",
    "spec",
    "spec_of_class",
    "MixerTokens",
    "FfnTokens",
    "TokenNames",
]

_RESERVED = set("[]|()*0123456789 ")


@dataclass(frozen=True)
class PrimitiveSpec:
    """One primitive's facts.

    - ``token``: its letter in patterns; ``name``: for people.
    - ``module``/``cls``: where the behaviour lives (imported on first use).
    - ``mixer``: a sequence mixer (may be a branch of ``[X|Y]``) rather than a channel mixer.
    - ``options``: the shape fields it reads (its knobs).
    - ``split_fields``: shape fields a parallel group of k branches divides by k (each must be
      a multiple of k); ``split_multiple_of``: a field that must divide each branch's share of
      the first split field (Mamba-2's groups).
    - ``megatron``: its letter in Megatron-LM / Nemotron-H ``hybrid_override_pattern``.
    - ``colour``: its colour in pattern strips and plots.
    - ``native_export``: the native Hugging Face model kinds that hold it (``llama``,
      ``bamba``); any other pattern is exported with self-contained remote code.
    """

    token: str
    name: str
    module: str
    cls: str
    mixer: bool
    options: tuple[str, ...] = ()
    split_fields: tuple[str, ...] = ()
    split_multiple_of: str | None = None
    megatron: str | None = None
    colour: str = "#cccccc"
    native_export: tuple[str, ...] = ()


_P = "hcomposer.primitives."
_ATTN = ("n_heads", "n_kv_heads", "head_dim", "rope_theta", "attn_bias", "qk_norm")

SPECS: dict[str, PrimitiveSpec] = {
    s.token: s
    for s in (
        PrimitiveSpec(token="A", name="attention", module=_P + "attention", cls="Attention",
                      mixer=True, options=_ATTN, split_fields=("n_heads", "n_kv_heads"),
                      megatron="*", colour="#d62728", native_export=("llama", "bamba")),
        PrimitiveSpec(token="W", name="sliding-window attention", module=_P + "attention",
                      cls="SlidingWindowAttention", mixer=True, options=(*_ATTN, "window"),
                      split_fields=("n_heads", "n_kv_heads"), colour="#ff9896"),
        PrimitiveSpec(token="F", name="SwiGLU MLP", module=_P + "mlp", cls="MLP", mixer=False,
                      options=("ffn_dim",), megatron="-", colour="#1f77b4",
                      native_export=("llama", "bamba")),
        PrimitiveSpec(token="E", name="mixture of experts", module=_P + "moe",
                      cls="MixtureOfExperts", mixer=False,
                      options=("n_experts", "top_k", "n_shared_experts", "expert_ffn_dim",
                               "router", "moe_balance", "moe_bias_rate"),
                      megatron="E", colour="#9467bd"),
        PrimitiveSpec(token="S", name="Mamba-2", module=_P + "mamba2", cls="Mamba2", mixer=True,
                      options=("ssm_state", "ssm_expand", "ssm_head_dim", "ssm_conv",
                               "ssm_groups", "ssm_chunk"),
                      split_fields=("ssm_heads",), split_multiple_of="ssm_groups",
                      megatron="M", colour="#2ca02c", native_export=("bamba",)),
        PrimitiveSpec(token="D", name="Gated DeltaNet", module=_P + "deltanet",
                      cls="GatedDeltaNet", mixer=True,
                      options=("dn_heads", "dn_head_dim", "dn_v_heads", "dn_v_head_dim",
                               "dn_conv", "dn_chunk"),
                      split_fields=("dn_heads", "dn_v_heads"), colour="#ff7f0e"),
    )
}  # fmt: skip


def register(new: PrimitiveSpec) -> None:
    """Add a primitive (its class must live at ``new.module``/``new.cls``)."""
    t = new.token
    if len(t) != 1 or not t.isupper() or t in _RESERVED:
        raise PatternError(f"primitive token {t!r}: use one upper-case letter")
    if t in SPECS:
        raise PatternError(f"primitive token {t!r} is taken by {SPECS[t].name}")
    if new.megatron is not None and any(s.megatron == new.megatron for s in SPECS.values()):
        raise PatternError(f"Megatron letter {new.megatron!r} is taken")
    SPECS[t] = new


def unregister(token: str) -> None:
    """Remove a registered primitive (tests use it to clean up a toy one)."""
    SPECS.pop(token, None)


def spec(token: str) -> PrimitiveSpec:
    """The spec of ``token``; an unknown token lists the valid ones."""
    if token not in SPECS:
        raise PatternError(f"unknown primitive {token!r}; valid: {', '.join(SPECS)}")
    return SPECS[token]


def spec_of_class(module: str, cls: str) -> PrimitiveSpec | None:
    """The spec whose behaviour is the class ``cls`` of ``module``, or None."""
    return next((s for s in SPECS.values() if s.module == module and s.cls == cls), None)


class _LiveTokens(Set):
    """The tokens of the registry with a property, read live (a later register() counts)."""

    mixer: bool

    def _tokens(self) -> list[str]:
        return [t for t, s in SPECS.items() if s.mixer == self.mixer]

    def __contains__(self, token: object) -> bool:
        return isinstance(token, str) and token in SPECS and SPECS[token].mixer == self.mixer

    def __iter__(self) -> Iterator[str]:
        return iter(self._tokens())

    def __len__(self) -> int:
        return len(self._tokens())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({''.join(self._tokens())!r})"


class MixerTokens(_LiveTokens):
    """Sequence mixers: the tokens that may be branches of a parallel group."""

    mixer = True


class FfnTokens(_LiveTokens):
    """Channel mixers (feed-forward)."""

    mixer = False


class TokenNames(Mapping):
    """token -> human name, read live from the registry."""

    def __getitem__(self, token: str) -> str:
        return SPECS[token].name

    def __iter__(self) -> Iterator[str]:
        return iter(SPECS)

    def __len__(self) -> int:
        return len(SPECS)

    def __repr__(self) -> str:
        return repr({t: s.name for t, s in SPECS.items()})
