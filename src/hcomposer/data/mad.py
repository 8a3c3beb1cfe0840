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
  weights; each key is followed by an insert token and its value is predicted at the key.

Every example is ``inputs[T]`` and ``targets[T]`` where ``targets[t]`` is the token the
model must output at position ``t`` (``-100`` where nothing is scored). All examples
of a split are generated at once with numpy arrays from one ``numpy.random.Generator``
seeded by the caller: no global random state, the same seed gives the same data.

Vocabulary layout (per task, all ids < ``vocab_size``): recall tasks split the
non-noise ids into a key half and a value half; noise ids and special tokens
(copy, blank, insert, compression) sit at the top of the range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from hcomposer.config_io import Config
from hcomposer.errors import UserError
from hcomposer.fields import spec

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
class MADTaskConfig(Config):
    """One MAD task at one difficulty. Frozen; round-trips to JSON.

    The knobs are MAD's: ``vocab_size``, ``seq_len``, ``num_train_examples``,
    ``frac_noise``/``noise_vocab_size`` (noisy recall), ``k_motif_size``/``v_motif_size``
    (fuzzy recall), ``num_tokens_to_copy`` (selective copying). Fields a task does not
    use are ignored by it. ``num_val_examples`` sizes the validation set (the learning
    rate is chosen and early stopping decided on it) and ``num_test_examples`` the
    held-out test set (the reported score).
    """

    _what: ClassVar[str] = "MAD task"

    task: str = spec(choices=MAD_TASKS, help="which MAD task")
    vocab_size: int = spec(16, ge=2, le=2**20, unit="tokens")
    seq_len: int = spec(64, ge=2, le=2**20, unit="tokens")
    num_train_examples: int = spec(4096, ge=1, le=10**7)
    num_test_examples: int = spec(256, ge=1, le=10**7, help="the held-out set scored")
    num_val_examples: int = spec(256, ge=1, le=10**7, help="chooses the lr, decides early stops")
    frac_noise: float = spec(0.0, ge=0, lt=1.0, help="noisy recall: share of noise tokens")
    noise_vocab_size: int = spec(0, ge=0, le=2**20, help="noisy recall: noise tokens")
    k_motif_size: int = spec(1, ge=1, le=2**10, help="fuzzy recall: tokens per key")
    v_motif_size: int = spec(1, ge=1, le=2**10, help="fuzzy recall: tokens per value")
    num_tokens_to_copy: int = spec(8, ge=1, le=2**20, help="selective copying: content tokens")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_task(self)


def _check_task(c: MADTaskConfig) -> None:
    # Ranges and the task name are the fields' declarations; here what spans fields.
    def bad(why: str) -> None:
        raise UserError(f"MAD task {c.task!r}: {why}")

    if c.frac_noise > 0 and c.noise_vocab_size < 1:
        bad("frac_noise > 0 needs noise_vocab_size >= 1")
    free = c.vocab_size - c.noise_vocab_size - _n_special(c.task)
    if free < (2 if c.task not in ("selective_copying", "compression") else 1):
        bad(f"vocab_size={c.vocab_size} leaves no room for keys/values or content tokens")
    if c.task == "selective_copying" and c.seq_len <= 2 * c.num_tokens_to_copy + 1:
        bad(f"seq_len={c.seq_len} must exceed 2 * num_tokens_to_copy + 1")
    if c.task == "fuzzy_in_context_recall":
        if c.seq_len < 2 * (c.k_motif_size + c.v_motif_size):
            bad("seq_len must hold at least two key-value pairs")
        if free // 2 < c.k_motif_size or free - free // 2 < c.v_motif_size:
            bad("a key or value motif needs that many distinct key or value tokens")


def _n_special(task: str) -> int:
    # copy + blank for selective copying; compression/insert token; none for recall
    return {"selective_copying": 2}.get(task, 0 if task.endswith("recall") else 1)


def default_task_config(task: str, **changes: Any) -> MADTaskConfig:
    """The CPU-sized default difficulty of one task (MAD's tasks, shortened).

    MAD's baselines use 128-256 tokens and 12,800 examples for 200 epochs on a GPU; the
    defaults keep MAD's six tasks and their vocabularies (16 tokens; 16 more as noise) but
    use sequences of 32 tokens, and memorisation a 1,024-token vocabulary (511 keys) so that
    it is not solved by every pattern within the first steps. Chosen by the calibration in
    ``benchmarks/calibrate_proxy.py`` (``docs/proxies.md``).
    """
    base = {
        "in_context_recall": dict(vocab_size=16, seq_len=32),
        "fuzzy_in_context_recall": dict(vocab_size=16, seq_len=32, k_motif_size=3, v_motif_size=3),
        "noisy_in_context_recall": dict(
            vocab_size=32, seq_len=32, noise_vocab_size=16, frac_noise=0.2
        ),
        "selective_copying": dict(vocab_size=16, seq_len=32, num_tokens_to_copy=8),
        "compression": dict(vocab_size=16, seq_len=32),
        "memorization": dict(vocab_size=1024, seq_len=32, num_train_examples=256),
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
    # validation split (model selection and early stopping); None: use the test split
    val_inputs: np.ndarray | None = None
    val_targets: np.ndarray | None = None

    def val_split(self) -> tuple[np.ndarray, np.ndarray]:
        """The validation examples, or the test examples when there are none."""
        if self.val_inputs is None or self.val_targets is None:
            return self.test_inputs, self.test_targets
        return self.val_inputs, self.val_targets


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
    va_x, va_y = gen(config, rng, config.num_val_examples, **extra)
    return MADData(
        config,
        tr_x,
        tr_y,
        te_x,
        te_y,
        pooled=config.task == "compression",
        val_inputs=va_x,
        val_targets=va_y,
    )


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

    Each sequence draws its own pool of distinct keys (motifs of 1..k_motif distinct key
    tokens, the length uniform over 1..k_motif) and maps them one to one onto distinct
    values (motifs of 1..v_motif distinct value tokens): no two keys of a sequence share
    a value, so guessing the most frequent value seen so far is no better than chance.
    Pairs are drawn from the pool and laid end to end; a pair becomes noise (random noise
    tokens, same length) at rate ``frac_noise``. The value tokens of a pair whose key
    already appeared earlier in the sequence are the targets.
    """
    n_key_codes = _n_motifs(n_key_tokens, k_motif)
    n_value_codes = _n_motifs(n_value_tokens, v_motif)
    if pool_size is None:
        pool_size = n_key_codes
    pool_size = min(pool_size, n_key_codes, n_value_codes)
    key_tok, key_len = _distinct_motifs(rng, n, pool_size, n_key_tokens, k_motif)
    val_tok, v_len = _distinct_motifs(rng, n, pool_size, n_value_tokens, v_motif)
    val_tok = val_tok + value_offset

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


def _n_motifs(n_tokens: int, max_len: int) -> int:
    """How many motifs of 1..max_len distinct tokens out of ``n_tokens`` exist."""
    total, count = 0, 1
    for ell in range(1, min(max_len, n_tokens) + 1):
        count *= n_tokens - ell + 1
        total += count
    return total


def _distinct_motifs(
    rng: np.random.Generator, n: int, k: int, n_tokens: int, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` distinct motifs per row: tokens ``[n, k, max_len]`` (left-aligned) and lengths.

    A motif's length is uniform over ``1..max_len`` and its tokens are distinct (the
    first tokens of a random permutation of ``0..n_tokens-1``); rows holding a repeated
    motif are drawn again.
    """
    if max_len == 1:
        # One-token motifs: the first k of a random permutation per row.
        toks = np.argsort(rng.random((n, n_tokens)), axis=1)[:, :k, None]
        return toks.astype(np.int64), np.ones((n, k), dtype=np.int64)
    toks = np.zeros((n, k, max_len), dtype=np.int64)
    length = np.zeros((n, k), dtype=np.int64)
    todo = np.arange(n)
    for _ in range(1000):
        m = len(todo)
        length[todo] = rng.integers(1, max_len + 1, size=(m, k))
        toks[todo] = np.argsort(rng.random((m, k, n_tokens)), axis=2)[..., :max_len]
        # A motif's identity: its tokens up to its length, as one integer.
        j = np.arange(max_len)
        digits = np.where(j < length[todo][..., None], toks[todo] + 1, 0)
        code = (digits * (n_tokens + 1) ** j).sum(axis=2)
        srt = np.sort(code, axis=1)
        dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
        todo = todo[dup]
        if not len(todo):
            return toks, length
    raise RuntimeError("could not draw distinct motifs; enlarge the vocabulary")


def _recall_vocab(c: MADTaskConfig) -> dict[str, Any]:
    """The recall tasks' split of the vocabulary: keys, then values (half each, the odd id to
    the values), then the noise tokens."""
    free = c.vocab_size - c.noise_vocab_size
    keys, values = free // 2, free - free // 2
    return {
        "n_key_tokens": keys,
        "n_value_tokens": values,
        "value_offset": keys,
        "frac_noise": c.frac_noise,
        "noise_offset": keys + values,
        "noise_vocab": c.noise_vocab_size,
    }


def _in_context_recall(c: MADTaskConfig, rng, n, **_):
    return _kv_sequences(rng, n, c.seq_len, **_recall_vocab(c))


def _fuzzy_in_context_recall(c: MADTaskConfig, rng, n, **_):
    # Keys drawn per sequence, as many as there is room for about two pairs each
    # (a mean pair is (k + 1) / 2 + (v + 1) / 2 tokens long): most keys come back.
    mean_pair = (c.k_motif_size + c.v_motif_size + 2) / 2
    pool = max(2, int(c.seq_len / mean_pair) // 2)
    return _kv_sequences(
        rng,
        n,
        c.seq_len,
        k_motif=c.k_motif_size,
        v_motif=c.v_motif_size,
        pool_size=pool,
        **_recall_vocab(c),
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
    # The compression token is the same in every sequence: not scored (a free point).
    y[:, -1] = IGNORE
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
    # One to one (MAD): key i -> a distinct value id; needs at least as many values.
    return rng.permutation(np.arange(keys, free))[:keys]  # key id -> value id


def _memorization(c: MADTaskConfig, rng, n, *, kv_map: np.ndarray):
    insert = c.vocab_size - 1
    pairs = c.seq_len // 2
    k = rng.integers(0, len(kv_map), size=(n, pairs))
    x = np.full((n, c.seq_len), insert, dtype=np.int64)
    y = np.full((n, c.seq_len), IGNORE, dtype=np.int64)
    x[:, 0 : 2 * pairs : 2] = k
    # At each key the model outputs that key's value (the insert token after it
    # separates the pairs). Scored at the key itself, so the answer needs no token
    # mixing at all: a channel mixer that memorised the map can give it.
    y[:, 0 : 2 * pairs : 2] = kv_map[k]
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
