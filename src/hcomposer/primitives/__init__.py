"""The registry of primitives: one token, one class, one file."""

from __future__ import annotations

import importlib

from hcomposer.errors import PatternError
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
]

# token -> (module in this package, class). Resolved on first use so that a
# primitive's heavier imports are paid only by patterns that use it.
PRIMITIVES: dict[str, tuple[str, str]] = {
    "A": ("attention", "Attention"),
    "W": ("attention", "SlidingWindowAttention"),
    "F": ("mlp", "MLP"),
    "E": ("moe", "MixtureOfExperts"),
    "S": ("mamba2", "Mamba2"),
    "D": ("deltanet", "GatedDeltaNet"),
}


def primitive_class(token: str) -> type[Primitive]:
    """The class behind one token; an unknown token lists the valid ones."""
    if token not in PRIMITIVES:
        raise PatternError(f"unknown primitive {token!r}; valid: {', '.join(PRIMITIVES)}")
    module, name = PRIMITIVES[token]
    return getattr(importlib.import_module(f"hcomposer.primitives.{module}"), name)


class _Registry(dict):
    def __missing__(self, token: str) -> type[Primitive]:
        cls = primitive_class(token)
        self[token] = cls
        return cls


_CLASSES = _Registry()


def build_sublayer(tokens: tuple[str, ...], shape) -> Primitive:
    """One sublayer's primitive: a single token, or a parallel group of mixers."""
    if len(tokens) == 1:
        return _CLASSES[tokens[0]](shape)
    return ParallelGroup(shape, tokens, _CLASSES)
