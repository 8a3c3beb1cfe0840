"""MAD synthetic tasks (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid Architectures").

Six token tasks, each probing one capability a sequence mixer or channel mixer may have:

- ``in_context_recall``: key-value pairs with a map drawn per sequence; each time a key
  comes back, predict its value (multi-query, as the MAD benchmark runs it).
- ``fuzzy_in_context_recall``: the same with keys and values of 1..k / 1..v tokens.
- ``noisy_in_context_recall``: the same with pairs replaced by noise tokens at a rate.
- ``selective_copying``: content tokens scattered among blanks; after a copy token,
  reproduce them in order (needs content-dependent selection, not a fixed shift).
- ``compression``: encode a random sequence into the last position's hidden state; a
  small decoder must rebuild every token from that one vector.
- ``memorization``: one fixed key->value map for the whole task, learnt into the
  weights; the sequence gives a key and an insert token, the value is predicted.

Every example is ``inputs[T]`` and ``targets[T]`` where ``targets[t]`` is the token the
model must output at position ``t`` (``-100`` where nothing is scored). All examples
of a split are generated at once with numpy arrays from one ``numpy.random.Generator``
seeded by the caller: no global random state, the same seed gives the same data.

Vocabulary layout (per task, all ids < ``vocab_size``): recall tasks split the
non-noise ids into a key half and a value half; noise ids and special tokens
(copy, blank, insert, compression) sit at the top of the range.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from hcomposer.errors import UserError

__all__ = [
    "IGNORE",
    "MAD_TASKS",
    "MADTaskConfig",
    "MADData",
    "default_task_config",
    "generate_task",
]

IGNORE = -100

MAD_TASKS: tuple[str, ...] = (
    "in_context_recall",
    "fuzzy_in_context_recall",
    "noisy_in_context_recall",
    "selective_copying",
    "compression",
    "memorization",
)


@dataclass(frozen=True, kw_only=True)
class MADTaskConfig:
    """One MAD task at one difficulty. Frozen; round-trips to JSON.

    The knobs are MAD's: ``vocab_size``, ``seq_len``, ``num_train_examples``,
    ``frac_noise``/``noise_vocab_size`` (noisy recall), ``k_motif_size``/``v_motif_size``
    (fuzzy recall), ``num_tokens_to_copy`` (selective copying). Fields a task does not
    use are ignored by it. ``num_test_examples`` sizes the held-out set.
    """

    task: str
    vocab_size: int = 16
    seq_len: int = 64
    num_train_examples: int = 4096
    num_test_examples: int = 256
    frac_noise: float = 0.0
    noise_vocab_size: int = 0
    k_motif_size: int = 1
    v_motif_size: int = 1
    num_tokens_to_copy: int = 8

    def __post_init__(self) -> None:
        _check_task(self)

    def replace(self, **changes: Any) -> MADTaskConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MADTaskConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"unknown MAD task field(s) {unknown}; valid: {sorted(names)}")
        return cls(**data)


def _check_task(c: MADTaskConfig) -> None:
    def bad(why: str) -> None:
        raise UserError(f"MAD task {c.task!r}: {why}")

    if c.task not in MAD_TASKS:
        raise UserError(f"unknown MAD task {c.task!r}; valid: {', '.join(MAD_TASKS)}")
    for name in ("vocab_size", "seq_len", "num_train_examples", "num_test_examples"):
        if getattr(c, name) < 1:
            bad(f"{name} must be at least 1")
    if not 0.0 <= c.frac_noise < 1.0:
        bad(f"frac_noise={c.frac_noise} must be in [0, 1)")
    if c.frac_noise > 0 and c.noise_vocab_size < 1:
        bad("frac_noise > 0 needs noise_vocab_size >= 1")
    if c.k_motif_size < 1 or c.v_motif_size < 1:
        bad("k_motif_size and v_motif_size must be at least 1")
    free = c.vocab_size - c.noise_vocab_size - _n_special(c.task)
    if free < (2 if c.task not in ("selective_copying", "compression") else 1):
        bad(f"vocab_size={c.vocab_size} leaves no room for keys/values or content tokens")
    if c.task == "selective_copying" and c.seq_len <= 2 * c.num_tokens_to_copy + 1:
        bad(f"seq_len={c.seq_len} must exceed 2 * num_tokens_to_copy + 1")
    if c.task == "fuzzy_in_context_recall" and c.seq_len < 2 * (c.k_motif_size + c.v_motif_size):
        bad("seq_len must hold at least two key-value pairs")
    if c.seq_len < 2:
        bad("seq_len must be at least 2")


def _n_special(task: str) -> int:
    # copy + blank for selective copying; compression/insert token; none for recall
    return {"selective_copying": 2}.get(task, 0 if task.endswith("recall") else 1)


def default_task_config(task: str, **changes: Any) -> MADTaskConfig:
    """The CPU-sized default difficulty of one task (MAD's baselines, shortened).

    MAD's baselines use 128-256 tokens and 12,800 examples for 200 epochs on a GPU;
    the defaults keep MAD's vocabularies and the structure of each task but shorten
    the sequences so that a full six-task evaluation fits in minutes on two CPU cores.
    """
    base = {
        "in_context_recall": dict(vocab_size=16, seq_len=64),
        "fuzzy_in_context_recall": dict(vocab_size=16, seq_len=64, k_motif_size=3, v_motif_size=3),
        "noisy_in_context_recall": dict(
            vocab_size=32, seq_len=64, noise_vocab_size=16, frac_noise=0.2
        ),
        "selective_copying": dict(vocab_size=16, seq_len=64, num_tokens_to_copy=8),
        "compression": dict(vocab_size=16, seq_len=32),
        "memorization": dict(vocab_size=256, seq_len=32, num_train_examples=256),
    }
    if task not in base:
        raise UserError(f"unknown MAD task {task!r}; valid: {', '.join(MAD_TASKS)}")
    return MADTaskConfig(task=task, **{**base[task], **changes})


@dataclass(frozen=True)
class MADData:
    """Generated examples of one task: int64 arrays ``[N, T]`` for train and test.

    ``config`` is the task's config (a ``MADTaskConfig`` or an MQAR config).
    """

    config: Any
    train_inputs: np.ndarray
    train_targets: np.ndarray
    test_inputs: np.ndarray
    test_targets: np.ndarray
    # compression scores a decoder output per position, not next-token logits
    pooled: bool = False


def generate_task(config: MADTaskConfig, seed: int) -> MADData:
    """Train and held-out examples of one task, determined by ``(config, seed)``."""
    rng = np.random.default_rng([seed, MAD_TASKS.index(config.task)])
    gen = _GENERATORS[config.task]
    extra: dict[str, Any] = {}
    if config.task == "memorization":
        # One map for the whole task: train and test share it (that is the task).
        extra["kv_map"] = _memorization_map(config, rng)
    tr_x, tr_y = gen(config, rng, config.num_train_examples, **extra)
    te_x, te_y = gen(config, rng, config.num_test_examples, **extra)
    return MADData(config, tr_x, tr_y, te_x, te_y, pooled=config.task == "compression")


def _kv_sequences(
    rng: np.random.Generator,
    n: int,
    seq_len: int,
    *,
    n_key_tokens: int,
    n_value_tokens: int,
    value_offset: int,
    k_motif: int = 1,
    v_motif: int = 1,
    pool_size: int | None = None,
    frac_noise: float = 0.0,
    noise_offset: int = 0,
    noise_vocab: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of key-value pairs with a map drawn per sequence (recall tasks).

    Each sequence has a pool of distinct keys (motifs of 1..k_motif key tokens), each
    mapped to a value (1..v_motif value tokens). Pairs are drawn from the pool and laid
    end to end; a pair becomes noise (random noise tokens, same length) at rate
    ``frac_noise``. The value tokens of a pair whose key already appeared earlier in
    the sequence are the targets.
    """
    # Motif codes: lengths 1..k, code c in block l encodes l base-n digits.
    k_counts = [n_key_tokens**ell for ell in range(1, k_motif + 1)]
    n_key_codes = int(sum(k_counts))
    if pool_size is None:
        pool_size = n_key_codes
    pool_size = min(pool_size, n_key_codes)
    pool = _distinct_codes(rng, n, pool_size, n_key_codes)  # [n, U]
    key_tok, key_len = _decode_motifs(pool, n_key_tokens, k_motif)  # [n,U,k], [n,U]
    v_len = rng.integers(1, v_motif + 1, size=(n, pool_size))
    val_tok = rng.integers(0, n_value_tokens, size=(n, pool_size, v_motif)) + value_offset

    min_pair = 2
    n_pairs = seq_len // min_pair + 1
    pick = rng.integers(0, pool_size, size=(n, n_pairs))  # pool index of each pair
    rows = np.arange(n)[:, None]
    p_klen = key_len[rows, pick]
    p_vlen = v_len[rows, pick]
    p_len = p_klen + p_vlen
    width = k_motif + v_motif
    # pair tokens [n, P, width]: key tokens, then value tokens, left-aligned
    j = np.arange(width)[None, None, :]
    k_part = np.take_along_axis(key_tok[rows, pick], np.minimum(j, k_motif - 1), axis=2)
    v_idx = np.clip(j - p_klen[..., None], 0, v_motif - 1)
    v_part = np.take_along_axis(val_tok[rows, pick], v_idx, axis=2)
    toks = np.where(j < p_klen[..., None], k_part, v_part)
    is_value = (j >= p_klen[..., None]) & (j < p_len[..., None])

    noise = np.zeros((n, n_pairs), dtype=bool)
    if frac_noise > 0:
        noise = rng.random((n, n_pairs)) < frac_noise
        noise_tok = rng.integers(0, noise_vocab, size=toks.shape) + noise_offset
        toks = np.where(noise[..., None], noise_tok, toks)
    # A key is "seen" once a non-noise pair showed it; later showings are queries.
    onehot = np.zeros((n, n_pairs, pool_size), dtype=np.int32)
    onehot[rows, np.arange(n_pairs)[None, :], pick] = ~noise
    seen_before = (np.cumsum(onehot, axis=1) - onehot)[rows, np.arange(n_pairs)[None, :], pick] > 0
    scored = is_value & (seen_before & ~noise)[..., None]

    # Lay the pairs end to end from the left and cut at seq_len + 1 tokens (one
    # extra for the shift). Only the last pair can be cut; a cut pair's key was
    # never complete before its kept value tokens, so its targets stay valid.
    total = seq_len + 1
    start = np.cumsum(p_len, axis=1) - p_len
    pos = start[..., None] + j
    valid = (j < p_len[..., None]) & (pos < total)
    seq = np.zeros((n, total), dtype=np.int64)
    lab = np.zeros((n, total), dtype=bool)
    r3 = np.broadcast_to(rows[..., None], pos.shape)
    seq[r3[valid], pos[valid]] = toks[valid]
    lab[r3[valid], pos[valid]] = scored[valid]
    return _shift(seq, lab)


def _shift(seq: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Next-token format: input ``seq[:, :-1]``, target ``seq[:, 1:]`` where scored."""
    inputs = seq[:, :-1]
    targets = np.where(lab[:, 1:], seq[:, 1:], IGNORE)
    return np.ascontiguousarray(inputs), np.ascontiguousarray(targets)


def _distinct_codes(rng: np.random.Generator, n: int, k: int, space: int) -> np.ndarray:
    """``k`` distinct integers in ``[0, space)`` per row, as an array ``[n, k]``."""
    if space <= 4096:
        # A random permutation per row (argsort of uniform noise), first k kept.
        return np.argsort(rng.random((n, space)), axis=1)[:, :k]
    out = rng.integers(0, space, size=(n, k))
    for _ in range(100):
        srt = np.sort(out, axis=1)
        dup_rows = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
        if not dup_rows.any():
            return out
        out[dup_rows] = rng.integers(0, space, size=(int(dup_rows.sum()), k))
    raise RuntimeError("could not draw distinct key motifs; enlarge the key vocabulary")


def _decode_motifs(codes: np.ndarray, base: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Motif codes -> tokens ``[..., max_len]`` (left-aligned) and lengths."""
    counts = np.array([base**ell for ell in range(1, max_len + 1)])
    bounds = np.cumsum(counts)
    length = np.searchsorted(bounds, codes, side="right") + 1
    within = codes - np.concatenate([[0], bounds])[length - 1]
    digits = np.stack([(within // base**i) % base for i in range(max_len)], axis=-1)
    return digits.astype(np.int64), length


def _in_context_recall(c: MADTaskConfig, rng, n, **_):
    keys = (c.vocab_size - c.noise_vocab_size) // 2
    values = c.vocab_size - c.noise_vocab_size - keys
    return _kv_sequences(
        rng,
        n,
        c.seq_len,
        n_key_tokens=keys,
        n_value_tokens=values,
        value_offset=keys,
        frac_noise=c.frac_noise,
        noise_offset=keys + values,
        noise_vocab=c.noise_vocab_size,
    )


def _fuzzy_in_context_recall(c: MADTaskConfig, rng, n, **_):
    free = c.vocab_size - c.noise_vocab_size
    keys, values = free // 2, free - free // 2
    # A pool of keys per sequence so that keys repeat: one key per ~2 pairs' room.
    pool = max(2, c.seq_len // (2 * (c.k_motif_size + c.v_motif_size)))
    return _kv_sequences(
        rng,
        n,
        c.seq_len,
        n_key_tokens=keys,
        n_value_tokens=values,
        value_offset=keys,
        k_motif=c.k_motif_size,
        v_motif=c.v_motif_size,
        pool_size=pool,
        frac_noise=c.frac_noise,
        noise_offset=keys + values,
        noise_vocab=c.noise_vocab_size,
    )


def _selective_copying(c: MADTaskConfig, rng, n, **_):
    copy_tok, blank = c.vocab_size - 1, c.vocab_size - 2
    m, T = c.num_tokens_to_copy, c.seq_len
    region = T - m - 1  # content tokens scattered among blanks here
    content = rng.integers(0, c.vocab_size - 2, size=(n, m))
    slots = np.sort(np.argsort(rng.random((n, region)), axis=1)[:, :m], axis=1)
    x = np.full((n, T), blank, dtype=np.int64)
    rows = np.arange(n)[:, None]
    x[rows, slots] = content
    x[:, region] = copy_tok
    # After the copy token the inputs are blanks; the outputs must be the content
    # tokens in order: position region + i outputs content[i].
    y = np.full((n, T), IGNORE, dtype=np.int64)
    y[:, region : region + m] = content
    return x, y


def _compression(c: MADTaskConfig, rng, n, **_):
    comp = c.vocab_size - 1
    x = rng.integers(0, c.vocab_size - 1 - c.noise_vocab_size, size=(n, c.seq_len))
    x[:, -1] = comp
    y = x.copy()
    if c.frac_noise > 0:
        hit = rng.random((n, c.seq_len)) < c.frac_noise
        hit[:, -1] = False
        noise = (
            rng.integers(0, c.noise_vocab_size, size=x.shape)
            + c.vocab_size
            - 1
            - c.noise_vocab_size
        )
        x = np.where(hit, noise, x)
        y = np.where(hit, IGNORE, y)
    return x.astype(np.int64), y.astype(np.int64)


def _memorization_map(c: MADTaskConfig, rng) -> np.ndarray:
    free = c.vocab_size - 1 - c.noise_vocab_size
    keys = free // 2
    return rng.integers(keys, free, size=keys)  # key id -> value id


def _memorization(c: MADTaskConfig, rng, n, *, kv_map: np.ndarray):
    insert = c.vocab_size - 1
    pairs = c.seq_len // 2
    k = rng.integers(0, len(kv_map), size=(n, pairs))
    x = np.full((n, c.seq_len), insert, dtype=np.int64)
    y = np.full((n, c.seq_len), IGNORE, dtype=np.int64)
    x[:, 0 : 2 * pairs : 2] = k
    # At the insert token after a key the model outputs that key's value.
    y[:, 1 : 2 * pairs : 2] = kv_map[k]
    if c.frac_noise > 0:
        free = c.vocab_size - 1 - c.noise_vocab_size
        hit = rng.random((n, pairs)) < c.frac_noise
        noise = rng.integers(free, free + c.noise_vocab_size, size=(n, pairs, 2))
        x2 = x[:, : 2 * pairs].reshape(n, pairs, 2)
        y2 = y[:, : 2 * pairs].reshape(n, pairs, 2)
        x2[hit] = noise[hit]
        y2[hit] = IGNORE
    return x, y


_GENERATORS = {
    "in_context_recall": _in_context_recall,
    "fuzzy_in_context_recall": _fuzzy_in_context_recall,
    "noisy_in_context_recall": _in_context_recall,
    "selective_copying": _selective_copying,
    "compression": _compression,
    "memorization": _memorization,
}
