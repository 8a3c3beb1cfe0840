"""The primitives: one class per token, one file each. Which class a token names is declared
in the one registry, :mod:`hcomposer.primitive_specs`; this package resolves it."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from hcomposer.primitive_specs import SPECS, spec
from hcomposer.primitives.base import Linear, Primitive, RMSNorm
from hcomposer.primitives.hybrid import ParallelGroup

__all__ = [
    "PRIMITIVES",
    "Primitive",
    "RMSNorm",
    "Linear",
    "ParallelGroup",
    "primitive_class",
    "build_sublayer",
    "sublayer_param_count",
]


def primitive_class(token: str) -> type[Primitive]:
    """The class behind one token (imported on first use, so a primitive's heavier imports
    are paid only by patterns that use it); an unknown token lists the valid ones."""
    s = spec(token)
    return getattr(importlib.import_module(s.module), s.cls)


class _Classes(Mapping):
    """token -> class, read live from the registry."""

    def __getitem__(self, token: str) -> type[Primitive]:
        return primitive_class(token)

    def __iter__(self) -> Iterator[str]:
        return iter(SPECS)

    def __len__(self) -> int:
        return len(SPECS)


PRIMITIVES: Mapping[str, type[Primitive]] = _Classes()


def build_sublayer(tokens: tuple[str, ...], shape) -> Primitive:
    """One sublayer's primitive: a single token, or a parallel group of mixers."""
    if len(tokens) == 1:
        return primitive_class(tokens[0])(shape)
    return ParallelGroup(shape, tokens, PRIMITIVES)


def sublayer_param_count(tokens: tuple[str, ...], shape) -> int:
    """Exact parameters of one sublayer's primitive, from the classes' own ``param_count``
    (no weights are built)."""
    if len(tokens) == 1:
        return primitive_class(tokens[0]).param_count(shape)
    return ParallelGroup.group_param_count(shape, tokens, PRIMITIVES)
