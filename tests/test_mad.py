"""MAD and MQAR generators: checked against slow per-example reference readings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hcomposer.data.baselines import task_levels
from hcomposer.data.mad import (
    IGNORE,
    MAD_TASKS,
    MADTaskConfig,
    default_task_config,
    generate_task,
)
from hcomposer.data.mqar import MQARConfig, generate_mqar
from hcomposer.errors import UserError


def _small(task: str, **kw) -> MADTaskConfig:
    return default_task_config(task, **{"num_train_examples": 64, "num_test_examples": 32, **kw})


@pytest.mark.parametrize("task", MAD_TASKS)
def test_shapes_ranges_and_determinism(task):
    cfg = _small(task)
    a, b, c = generate_task(cfg, 3), generate_task(cfg, 3), generate_task(cfg, 4)
    for x, y in ((a.train_inputs, a.train_targets), (a.test_inputs, a.test_targets)):
        assert x.dtype == np.int64 and y.dtype == np.int64
        assert x.shape == y.shape and x.shape[1] == cfg.seq_len
        assert x.min() >= 0 and x.max() < cfg.vocab_size
        scored = y[y != IGNORE]
        assert scored.size > 0 and scored.min() >= 0 and scored.max() < cfg.vocab_size
    assert a.train_inputs.shape[0] == 64 and a.test_inputs.shape[0] == 32
    np.testing.assert_array_equal(a.train_inputs, b.train_inputs)
    np.testing.assert_array_equal(a.test_targets, b.test_targets)
    assert not np.array_equal(a.train_inputs, c.train_inputs)


def _segments(row: np.ndarray, n_keys: int, n_values: int) -> list[tuple[str, list[int], int]]:
    """Split a recall sequence into runs of key tokens, value tokens and noise tokens."""
    kinds = ["k" if t < n_keys else "v" if t < n_keys + n_values else "n" for t in row]
    out, start = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or kinds[i] != kinds[start]:
            out.append((kinds[start], [int(t) for t in row[start:i]], start))
            start = i
    return out


def _reference_recall_targets(x: np.ndarray, n_keys: int, n_values: int) -> dict[int, int]:
    """Slow reading of one input sequence: which positions must be scored, with what.

    A value run that follows a key run already seen earlier (outside noise) answers a
    query; each of its tokens is the target of the position before it.
    """
    expected: dict[int, int] = {}
    memory: dict[tuple, list[int]] = {}
    segs = _segments(x, n_keys, n_values)
    for (kind, toks, _), nxt in zip(segs, segs[1:]):
        if kind != "k" or nxt[0] != "v":
            continue
        key, value, start = tuple(toks), nxt[1], nxt[2]
        if key in memory:
            # The same key maps to the same value within a sequence.
            n = min(len(value), len(memory[key]))
            assert memory[key][:n] == value[:n]
            for off, t in enumerate(value):
                expected[start + off - 1] = t
        else:
            memory[key] = value
    return expected


@pytest.mark.parametrize(
    "task,kw",
    [
        ("in_context_recall", {}),
        ("fuzzy_in_context_recall", {}),
        ("noisy_in_context_recall", {"frac_noise": 0.4}),
        ("in_context_recall", {"vocab_size": 64, "seq_len": 128}),
    ],
)
def test_recall_targets_match_reference(task, kw):
    cfg = _small(task, **kw)
    d = generate_task(cfg, 0)
    free = cfg.vocab_size - cfg.noise_vocab_size
    n_keys, n_values = free // 2, free - free // 2
    last = cfg.seq_len - 1
    for x, y in zip(d.train_inputs, d.train_targets):
        expected = _reference_recall_targets(x, n_keys, n_values)
        got = {i: int(t) for i, t in enumerate(y) if t != IGNORE}
        # The last position's target lies beyond the inputs: only its kind is checkable.
        if last in got:
            assert n_keys <= got.pop(last) < n_keys + n_values
        assert got == expected
        assert len(got) > 0


def test_noise_tokens_are_never_targets():
    cfg = _small("noisy_in_context_recall", frac_noise=0.6)
    d = generate_task(cfg, 1)
    noise_lo = cfg.vocab_size - cfg.noise_vocab_size
    assert (d.train_inputs >= noise_lo).mean() > 0.3
    assert not (d.train_targets >= noise_lo).any()


def test_selective_copying_reference():
    cfg = _small("selective_copying", num_tokens_to_copy=6, seq_len=40)
    d = generate_task(cfg, 0)
    copy_tok, blank = cfg.vocab_size - 1, cfg.vocab_size - 2
    for x, y in zip(d.train_inputs, d.train_targets):
        at = int(np.flatnonzero(x == copy_tok)[0])
        content = [int(t) for t in x[:at] if t != blank]
        assert len(content) == 6
        assert [int(t) for t in y if t != IGNORE] == content
        assert (y[at : at + 6] == content).all() and (x[at + 1 :] == blank).all()


def test_compression_reconstructs_the_input_and_never_scores_its_token():
    d = generate_task(_small("compression"), 0)
    np.testing.assert_array_equal(d.train_inputs[:, :-1], d.train_targets[:, :-1])
    assert d.pooled and (d.train_inputs[:, -1] == 15).all()
    # The compression token is the same everywhere: scoring it would be a free point.
    assert (d.train_targets[:, -1] == IGNORE).all() and (d.test_targets[:, -1] == IGNORE).all()


def test_memorization_uses_one_one_to_one_map_for_train_and_test():
    d = generate_task(_small("memorization", num_train_examples=256, vocab_size=256), 0)
    mapping: dict[int, int] = {}
    for x, y in ((d.train_inputs, d.train_targets), (d.test_inputs, d.test_targets)):
        # scored at the key itself: a channel mixer alone can answer
        assert (y[:, 1::2] == IGNORE).all()
        keys, vals = x[:, 0::2].ravel(), y[:, 0::2].ravel()
        for k, v in zip(keys.tolist(), vals.tolist()):
            assert mapping.setdefault(k, v) == v
    assert len(mapping) == 127  # every key occurs in 256 x 16 draws
    # one to one (MAD): 127 keys, 127 distinct values
    assert len(set(mapping.values())) == len(mapping)


def _pairs(x: np.ndarray, n_keys: int, n_values: int) -> list[tuple[tuple, tuple]]:
    """The (key, value) runs of one recall sequence, in order (noise runs dropped)."""
    segs = _segments(x, n_keys, n_values)
    return [
        (tuple(a[1]), tuple(b[1])) for a, b in zip(segs, segs[1:]) if a[0] == "k" and b[0] == "v"
    ]


@pytest.mark.parametrize("task", ["in_context_recall", "noisy_in_context_recall"])
def test_recall_values_are_drawn_without_replacement(task):
    # Distinct keys of a sequence get distinct values, so "the most frequent value so
    # far" is not a shortcut (with replacement it scored about 0.33 against 0.125).
    cfg = _small(task)
    free = cfg.vocab_size - cfg.noise_vocab_size
    d = generate_task(cfg, 0)
    for x in d.train_inputs:
        # the last pair may be cut: leave it out
        kv = dict(_pairs(x, free // 2, free - free // 2)[:-1])
        assert len(set(kv.values())) == len(kv)


def test_fuzzy_recall_keys_as_mad_defines_them():
    cfg = _small("fuzzy_in_context_recall", num_train_examples=512)
    d = generate_task(cfg, 0)
    lengths, per_seq = [], []
    for x in d.train_inputs:
        pairs = _pairs(x, 8, 8)[1:-1]  # the first and last runs may be cut
        keys = {k for k, _ in pairs}
        per_seq.append(frozenset(keys))
        for k in keys:
            assert len(set(k)) == len(k)  # no token repeated within a key
            lengths.append(len(k))
        # one to one within the sequence
        kv = dict(pairs)
        assert len(set(kv.values())) == len(kv)
    share = np.bincount(lengths, minlength=4)[1:] / len(lengths)
    # key lengths uniform over 1..3 (length-weighted drawing gave 88% of length 3)
    assert np.all(np.abs(share - 1 / 3) < 0.06), share
    # keys drawn per sequence: hardly two sequences share their key set
    assert len(set(per_seq)) > 0.95 * len(per_seq)


def test_mqar_reference():
    cfg = MQARConfig(
        vocab_size=64, seq_len=48, num_kv_pairs=6, num_train_examples=40, num_test_examples=8
    )
    d = generate_mqar(cfg, 0)
    assert d.train_inputs.shape == (40, 48)
    for x, y in zip(d.train_inputs, d.train_targets):
        keys, values = x[0:12:2], x[1:12:2]
        assert len(set(keys.tolist())) == 6 and len(set(values.tolist())) == 6
        assert keys.min() >= 1 and keys.max() < 32 and values.min() >= 32
        scored = np.flatnonzero(y != IGNORE)
        assert len(scored) == 6 and scored.min() >= 12
        for pos in scored:
            k = x[pos]
            assert y[pos] == values[list(keys).index(k)]
    again = generate_mqar(cfg, 0)
    np.testing.assert_array_equal(d.test_inputs, again.test_inputs)


def test_mqar_fillers_never_form_a_key():
    # With fillers drawn from the whole vocabulary a filler often repeated a context
    # key followed by a random token: a fake pair that shadows the query.
    cfg = MQARConfig(vocab_size=128, seq_len=128, num_kv_pairs=16, num_train_examples=256)
    d = generate_mqar(cfg, 0)
    for x in d.train_inputs:
        keys = x[0:32:2]
        for k in keys:
            # once in the context, once as its query, nowhere else
            assert int((x == k).sum()) == 2


def test_validation_split_is_separate_and_deterministic():
    for d in (generate_task(_small("in_context_recall"), 5), generate_mqar(MQARConfig(), 5)):
        assert d.val_inputs is not None and d.val_inputs.shape[0] == 256
        assert not np.array_equal(d.val_inputs[:32], d.test_inputs[:32])
        assert not np.array_equal(d.val_inputs[:32], d.train_inputs[:32])


def test_configs_round_trip_and_reject_bad_input():
    for task in MAD_TASKS:
        cfg = default_task_config(task)
        assert MADTaskConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    m = MQARConfig(seq_len=32, num_kv_pairs=4)
    assert MQARConfig.from_dict(m.to_dict()) == m
    with pytest.raises(UserError, match="valid: in_context_recall"):
        MADTaskConfig(task="recal")
    with pytest.raises(UserError, match="num_tokens_to_copy"):
        default_task_config("selective_copying", seq_len=16, num_tokens_to_copy=8)
    with pytest.raises(UserError, match="noise_vocab_size"):
        default_task_config("in_context_recall", frac_noise=0.5)
    with pytest.raises(UserError, match="num_kv_pairs"):
        MQARConfig(seq_len=16, num_kv_pairs=8)
    with pytest.raises(UserError, match="unknown MAD task field"):
        MADTaskConfig.from_dict({"task": "compression", "bogus": 1})


# Reference levels of every task at its default difficulty (recorded in docs/proxies.md):
# (context-free accuracy, "most frequent answer so far" accuracy). A score at or below
# them shows no ability at the task.
LEVELS = {
    "in_context_recall": (0.13, 0.21),
    "fuzzy_in_context_recall": (0.135, 0.205),
    "noisy_in_context_recall": (0.13, 0.24),
    "selective_copying": (0.07, 0.27),
    "compression": (0.067, None),
    "memorization": (1.0, 0.0),
}


@pytest.mark.parametrize("task", MAD_TASKS)
def test_chance_and_context_averaging_levels(task):
    n_test = 256 if task == "memorization" else 1024
    d = generate_task(default_task_config(task, num_test_examples=n_test), 0)
    levels = task_levels(d)
    free, frequent = LEVELS[task]
    assert levels["context_free"] == pytest.approx(free, abs=0.03)
    if frequent is None:
        assert levels["frequent_answer"] is None
    else:
        assert levels["frequent_answer"] == pytest.approx(frequent, abs=0.03)


@pytest.mark.parametrize("task", ["in_context_recall", "noisy_in_context_recall"])
def test_averaging_shortcut_is_gone_at_sequence_64(task):
    # With values drawn with replacement "the most frequent value so far" scored about
    # 0.33 at sequence 64 (chance 0.125); drawn without replacement it is near chance.
    d = generate_task(default_task_config(task, seq_len=64, num_test_examples=1024), 0)
    levels = task_levels(d)
    assert levels["frequent_answer"] < levels["context_free"] + 0.07
