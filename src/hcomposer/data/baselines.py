"""Reference levels of the synthetic tasks: what a model scores without solving them.

Two predictors, both fitted and scored with plain counting (no training):

- :func:`context_free_accuracy`: the best prediction from the current input token alone
  (from the output position alone for a pooled task such as compression), fitted on the
  training split and scored on the test split. An MLP-only pattern sees nothing else, so
  this is its ceiling; on the recall tasks it is chance.
- :func:`frequent_answer_accuracy`: "average the context": predict the answer-type token
  (a token that is some target in the training split) seen most often in the context so
  far, ties going to the most recent. A mixer that merely pools its context gets this
  without linking keys to values.

A proxy score at or below these levels shows no ability at the task.
"""

from __future__ import annotations

import numpy as np

from hcomposer.data.mad import IGNORE, MADData

__all__ = ["context_free_accuracy", "frequent_answer_accuracy", "task_levels"]


def _keys(data: MADData, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if data.pooled:
        return np.broadcast_to(np.arange(y.shape[1])[None, :], y.shape)
    return x


def context_free_accuracy(data: MADData) -> float:
    """Accuracy of the best table ``current input token -> target`` (see the module)."""
    vocab = int(max(data.train_inputs.max(), data.test_inputs.max(), data.config.vocab_size))
    n_keys = max(vocab, data.train_targets.shape[1]) + 1
    k_tr = _keys(data, data.train_inputs, data.train_targets)
    m = data.train_targets != IGNORE
    counts = np.zeros((n_keys, vocab + 1), dtype=np.int64)
    np.add.at(counts, (k_tr[m], data.train_targets[m]), 1)
    table = counts.argmax(axis=1)
    k_te = _keys(data, data.test_inputs, data.test_targets)
    mt = data.test_targets != IGNORE
    return float((table[k_te[mt]] == data.test_targets[mt]).mean())


def frequent_answer_accuracy(data: MADData) -> float | None:
    """Accuracy of "the most frequent answer token so far" (None for pooled tasks)."""
    if data.pooled:
        return None
    answers = np.unique(data.train_targets[data.train_targets != IGNORE])
    x, y = data.test_inputs, data.test_targets
    n, t = x.shape
    vocab = int(max(x.max(), answers.max())) + 1
    is_answer = np.zeros(vocab, dtype=bool)
    is_answer[answers] = True
    onehot = np.zeros((n, t, vocab), dtype=np.float64)
    rows, cols = np.nonzero(is_answer[x])
    onehot[rows, cols, x[rows, cols]] = 1.0
    counts = np.cumsum(onehot, axis=1)
    # recency tie-break: the later the last sighting, the higher (always below 1)
    pos = np.where(onehot > 0, (np.arange(t) + 1)[None, :, None] / (t + 1), 0.0)
    last = np.maximum.accumulate(pos, axis=1)
    guess = (counts + last).argmax(axis=2)
    none_seen = counts.sum(axis=2) == 0
    m = y != IGNORE
    hit = (guess == y) & ~none_seen
    return float(hit[m].mean())


def task_levels(data: MADData) -> dict[str, float | None]:
    """Both reference levels of one generated task."""
    return {
        "context_free": context_free_accuracy(data),
        "frequent_answer": frequent_answer_accuracy(data),
    }
