"""The switch between the fast single-token decode paths and the plain reference paths.

Decoding one token at a time is memory-bound by nature (every weight and the whole cache are
read once per token), but the general paths written for training and prefill leave it far
from that limit on CPU: SDPA's CPU kernel for one query, bf16 products over a [T, hd] value
layout, per-step recomputation. The primitives take dedicated paths for a single new token;
``reference_decoding()`` turns them off, so that tests and ``benchmarks/bench_decode.py`` can
compare the two in one process. The switch is read when a cache is created and at each step;
a cache made under one setting must be decoded under the same one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["fast_decoding", "reference_decoding"]

_STATE = {"fast": True}


def fast_decoding() -> bool:
    """True unless inside ``reference_decoding()``."""
    return _STATE["fast"]


@contextmanager
def reference_decoding(enabled: bool = True) -> Iterator[None]:
    """Within the block, decode through the general (reference) paths."""
    before = _STATE["fast"]
    _STATE["fast"] = not enabled and before
    try:
        yield
    finally:
        _STATE["fast"] = before
