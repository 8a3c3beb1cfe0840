"""MQAR: multi-query associative recall (Arora, Eyuboglu et al. 2023, "Zoology").

A sequence opens with ``num_kv_pairs`` key-value pairs (distinct keys, distinct
values), then the keys come back as queries at random places in the rest of the
sequence; at each query the model must output that key's value. The distance from
the context to a query follows a power law (short gaps more likely), as in natural
text; positions that are not queries hold random tokens, never one of the sequence's
keys (a filler key would form a fake pair that shadows the real one). Harder than MAD's recall
because every key is seen once and the queries come many tokens later.

Examples are ``inputs[N, T]`` and ``targets[N, T]`` (``-100`` where nothing is
scored), generated at once from a ``numpy.random.Generator`` seeded by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from hcomposer.config_io import Config
from hcomposer.data.mad import IGNORE, MADData
from hcomposer.errors import UserError
from hcomposer.fields import spec

__all__ = ["MQARConfig", "generate_mqar", "DEFAULT_MQAR"]


@dataclass(frozen=True, kw_only=True)
class MQARConfig(Config):
    """One MQAR difficulty. Frozen; round-trips to JSON.

    ``vocab_size`` (keys from ids 1..V/2-1, values from V/2..V-1), ``seq_len``,
    ``num_kv_pairs``; ``power_a`` shapes the query-gap distribution (1.0 uniform,
    Zoology's 0.01 strongly favours short gaps).
    """

    _what: ClassVar[str] = "MQAR"

    vocab_size: int = spec(128, ge=4, le=2**20, unit="tokens")
    seq_len: int = spec(64, ge=2, le=2**20, unit="tokens", help="an even length")
    num_kv_pairs: int = spec(8, ge=1, le=2**20, help="key-value pairs per sequence")
    num_train_examples: int = spec(4096, ge=1, le=10**7)
    num_test_examples: int = spec(256, ge=1, le=10**7)
    num_val_examples: int = spec(256, ge=1, le=10**7)
    power_a: float = spec(0.01, gt=0, le=100.0, help="query-gap power law (1.0: uniform)")
    name: str = spec("", help="'' names it mqar_T<seq_len>_kv<pairs>")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seq_len % 2:
            raise UserError(f"MQAR seq_len={self.seq_len} must be even")
        if 4 * self.num_kv_pairs > self.seq_len:
            raise UserError(
                f"MQAR: num_kv_pairs={self.num_kv_pairs} needs seq_len >= {4 * self.num_kv_pairs}"
            )
        if self.num_kv_pairs >= self.vocab_size // 2 - 1:
            raise UserError(
                f"MQAR: num_kv_pairs={self.num_kv_pairs} must be in 1..{self.vocab_size // 2 - 2} "
                f"for vocab_size={self.vocab_size}"
            )
        if not self.name:
            object.__setattr__(self, "name", f"mqar_T{self.seq_len}_kv{self.num_kv_pairs}")

    def replace(self, **changes: Any) -> MQARConfig:
        return super().replace(**{"name": "", **changes})


# Growing sequence lengths with proportionally more pairs (Zoology varies both).
DEFAULT_MQAR: tuple[MQARConfig, ...] = (
    MQARConfig(seq_len=64, num_kv_pairs=8),
    MQARConfig(seq_len=128, num_kv_pairs=16),
)


def _mqar_split(c: MQARConfig, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    D, T, V = c.num_kv_pairs, c.seq_len, c.vocab_size
    half = V // 2
    # Distinct keys in 1..half-1 and distinct values in half..V-1 (random permutations).
    keys = np.argsort(rng.random((n, half - 1)), axis=1)[:, :D] + 1
    values = np.argsort(rng.random((n, V - half)), axis=1)[:, :D] + half
    context = 2 * D
    space = (T - context) // 2  # query slots: even offsets after the context
    p = c.power_a * np.arange(1, space + 1, dtype=np.float64) ** (c.power_a - 1)
    # D distinct slots per row drawn without replacement with probabilities p
    # (Gumbel top-k: the k largest log p + Gumbel noise).
    g = np.log(p)[None, :] - np.log(-np.log(rng.random((n, space))))
    slots = np.argsort(-g, axis=1)[:, :D]
    # Fillers never form a key: they are drawn from every token except this sequence's
    # keys, so no filler can shadow a query with a fake key-value pair.
    allowed = np.ones((n, V), dtype=bool)
    rows = np.arange(n)[:, None]
    allowed[rows, keys] = False
    others = np.argsort(~allowed, axis=1, kind="stable")[:, : V - D]  # allowed ids first
    seq = np.take_along_axis(others, rng.integers(0, V - D, size=(n, T + 1)), axis=1)
    seq[:, 0:context:2] = keys
    seq[:, 1:context:2] = values
    lab = np.full((n, T + 1), IGNORE, dtype=np.int64)
    qpos = context + 2 * slots
    seq[rows, qpos] = keys
    # After the one-token shift the query's own position outputs the value; the
    # input after a query stays random, so the answer is never given as input.
    lab[rows, qpos + 1] = values
    return np.ascontiguousarray(seq[:, :-1]), np.ascontiguousarray(lab[:, 1:])


def generate_mqar(config: MQARConfig, seed: int) -> MADData:
    """Train and held-out MQAR examples, determined by ``(config, seed)``."""
    rng = np.random.default_rng([seed, 7, config.seq_len, config.num_kv_pairs])
    tr = _mqar_split(config, rng, config.num_train_examples)
    te = _mqar_split(config, rng, config.num_test_examples)
    va = _mqar_split(config, rng, config.num_val_examples)
    return MADData(config, tr[0], tr[1], te[0], te[1], val_inputs=va[0], val_targets=va[1])
