"""Token batches streamed from a dataset record by record, with a position that resumes exactly.

The big recipes train on more text than fits a token-shard folder (20B tokens is 40-80 GB of
ids), so an ``hf:`` source is read through ``datasets`` in streaming mode: records arrive as
they are read (a Hub dataset's Parquet shards, a local Hub-style folder, ``.jsonl``/``.parquet``
files, or a folder written by ``Dataset.save_to_disk``), nothing is downloaded ahead.

Validation split. When the dataset has a ``validation`` (or ``valid``/``val``/``test``) split,
validation reads it and training reads the asked split. When it has one split only, a
document goes to validation when a hash of (seed, its text) falls below ``val_fraction``:
the rule depends on the text alone, so the two parts never share a document (duplicates
included) and every reader of the stream agrees without a list of indices.

Packing. Each document's ids are followed by the tokenizer's EOS id and laid back to back;
a batch is ``batch_size`` rows of ``seq_len + 1`` consecutive ids (``x`` the first ``seq_len``,
``y`` shifted by one), and each row consumes its ``seq_len + 1`` ids. At the end of the
stream the next epoch starts again from the first record.

Position. :meth:`TokenStream.state_dict` is (epoch, record, offset): the next id is number
``offset`` of record ``record`` (counted over the split's records, both parts) of epoch
``epoch``. Restoring it skips that many records without tokenising them, tokenises that one
record and drops ``offset`` ids, so a resumed stream yields exactly the batches the
uninterrupted one would have (tests/test_stream.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hcomposer.data.shards import TokenDataset, prepare_dataset
from hcomposer.data.sources import Source, resolve_source, stream_hf
from hcomposer.data.tokenizers import Tokenizer, get_tokenizer
from hcomposer.errors import UserError

__all__ = [
    "STREAM_FORMAT",
    "VAL_SPLITS",
    "TokenStream",
    "StreamingDataset",
    "open_records",
    "dataset_splits",
    "in_validation",
    "is_streamed",
    "open_validation",
    "check_training_inputs",
]

STREAM_FORMAT = "hcomposer.stream/1"
# Split names that hold validation text, most specific first.
VAL_SPLITS = ("validation", "valid", "val", "test")
_ENCODE_BATCH = 32


def is_streamed(source: Source) -> bool:
    """Whether training reads ``source`` as a stream (``hf:`` sources) rather than shards."""
    return source.kind == "hf"


def dataset_splits(source: Source) -> tuple[str, ...]:
    """The dataset's split names (resolves the name: the check before any training starts)."""
    return tuple(stream_hf(source, None).keys())


def open_records(source: Source, split: str) -> Iterator[dict[str, Any]]:
    """The records of ``split``, streamed (``hf:`` sources) or read from local files."""
    if source.kind != "hf":
        return ({"text": t} for t in source.documents())
    ds = stream_hf(source, split)
    if ds.column_names is not None and "text" not in ds.column_names:
        raise UserError(f"dataset {source.spec!r} has no 'text' column ({ds.column_names})")
    return iter(ds)


def in_validation(text: str, seed: int, val_fraction: float) -> bool:
    """The hash rule: does this document belong to the validation part?"""
    h = hashlib.sha256(f"{seed}:".encode() + text.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") / 2.0**64 < val_fraction


def _plan(source: Source, val_fraction: float, seed: int) -> dict[str, Any]:
    """Which split each part reads and how they are told apart (see the module docstring)."""
    train = source.hf.get("split", "train") if source.kind == "hf" else "train"
    splits = dataset_splits(source) if source.kind == "hf" else ("train",)
    if train not in splits:
        raise UserError(
            f"dataset {source.spec!r} has no split {train!r} (splits: {', '.join(splits)})"
        )
    val = next((s for s in VAL_SPLITS if s in splits and s != train), None)
    if val is not None:
        return {"rule": "split", "train": train, "val": val}
    plan = {"rule": "hash", "train": train, "val": train}
    return {**plan, "val_fraction": val_fraction, "seed": seed}


class TokenStream:
    """One part (``train`` or ``val``) of a source as packed ids, with a resumable position."""

    def __init__(
        self, source: Source, tokenizer: Tokenizer, plan: dict[str, Any], part: str = "train"
    ):
        if part not in ("train", "val"):
            raise ValueError(f"part must be train or val, got {part!r}")
        self.source, self.tokenizer, self.plan, self.part = source, tokenizer, plan, part
        self._dtype = np.int64
        self.epoch, self.record, self.offset = 0, 0, 0
        self._docs: Iterator[tuple[int, np.ndarray]] | None = None
        self._cur = np.zeros(0, self._dtype)

    def _mine(self, text: str) -> bool:
        if self.plan["rule"] == "split":
            return True
        val = in_validation(text, self.plan["seed"], self.plan["val_fraction"])
        return val == (self.part == "val")

    def _documents(self, first: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(record index, ids + EOS)`` of this part's records from record ``first`` on."""
        records = open_records(self.source, self.plan[self.part])
        pending: list[tuple[int, str]] = []
        index = -1
        for index, rec in enumerate(records):
            if index < first:
                continue
            text = rec.get("text")
            if isinstance(text, str) and text and self._mine(text):
                pending.append((index, text))
            if len(pending) >= _ENCODE_BATCH:
                yield from self._encode(pending)
                pending = []
        yield from self._encode(pending)

    def _encode(self, pending: list[tuple[int, str]]) -> Iterator[tuple[int, np.ndarray]]:
        if not pending:
            return
        for (index, _), ids in zip(
            pending, self.tokenizer.encode_batch([t for _, t in pending]), strict=True
        ):
            arr = np.empty(len(ids) + 1, self._dtype)
            arr[:-1] = ids
            arr[-1] = self.tokenizer.eos_id
            yield index, arr

    def _next_document(self) -> None:
        if self._docs is None:
            self._docs = self._documents(self.record)
        nxt = next(self._docs, None)
        if nxt is None:
            # End of the stream: the next epoch starts from the first record.
            self.epoch, self.record, self.offset = self.epoch + 1, 0, 0
            self._docs = self._documents(0)
            nxt = next(self._docs, None)
            if nxt is None:
                raise UserError(
                    f"the {self.part} part of data source {self.source.spec!r} holds no text"
                )
        self.record, self._cur = nxt
        self.offset = 0

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` ids of the stream; the position moves past them."""
        out = np.empty(n, self._dtype)
        filled = 0
        while filled < n:
            if self.offset >= len(self._cur):
                self._next_document()
            k = min(n - filled, len(self._cur) - self.offset)
            out[filled : filled + k] = self._cur[self.offset : self.offset + k]
            filled += k
            self.offset += k
        return out

    def next_batch(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` LongTensors [batch_size, seq_len], ``y`` shifted by one."""
        rows = torch.from_numpy(self.take(batch_size * (seq_len + 1))).view(batch_size, -1)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        """The position, with what it is a position in (checked on restore)."""
        return {
            "format": STREAM_FORMAT,
            "source": self.source.spec,
            "tokenizer": self.tokenizer.identity,
            "plan": dict(self.plan),
            "part": self.part,
            "epoch": self.epoch,
            "record": self.record,
            "offset": self.offset,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position that :meth:`state_dict` returned."""
        mine = self.state_dict()
        for key in ("format", "source", "tokenizer", "plan", "part"):
            if state.get(key) != mine[key]:
                raise UserError(
                    f"the saved data position is for another {key} ({state.get(key)!r}, here "
                    f"{mine[key]!r}); resume with the run's original --data and --tokenizer"
                )
        self.epoch, self.record = int(state["epoch"]), int(state["record"])
        self._docs = self._documents(self.record)
        self._cur = np.zeros(0, self._dtype)
        self.offset = 0
        wanted = int(state["offset"])
        if wanted:
            self._next_document()
            if self.record != int(state["record"]) or wanted > len(self._cur):
                raise UserError(
                    f"data source {self.source.spec!r} changed since the position was saved "
                    f"(record {state['record']} is not where it was); restore it or start anew"
                )
            self.offset = wanted


class StreamingDataset:
    """What the trainer reads from an ``hf:`` source: consecutive training batches (one step
    after another; :meth:`state_dict` is saved with each checkpoint) and fixed validation
    windows from the start of the validation part."""

    def __init__(
        self, source: str | Source, tokenizer: Tokenizer, val_fraction: float = 0.02, seed: int = 0
    ):
        self.source = source if isinstance(source, Source) else resolve_source(source)
        self.plan = _plan(self.source, val_fraction, seed)
        self.train = TokenStream(self.source, tokenizer, self.plan, "train")
        self.tokenizer = tokenizer
        self.next_step = 0
        self._val: np.ndarray | None = None
        self.path = self.source.spec
        self.manifest: dict[str, Any] = {
            "format": STREAM_FORMAT,
            "source": self.source.describe(),
            "tokenizer": tokenizer.to_dict(),
            "split": self.plan,
        }

    def check_lengths(self, seq_len: int, eval_tokens: int) -> None:
        """Both parts hold text, and validation at least one window (reads only the start)."""
        self._val_tokens(max(eval_tokens, seq_len) + 1)
        probe = TokenStream(self.source, self.tokenizer, self.plan, "train")
        probe.take(1)

    def _val_tokens(self, n: int) -> np.ndarray:
        if self._val is None or len(self._val) < n:
            self._val = self._first_val(n)
        return self._val

    def _first_val(self, n: int) -> np.ndarray:
        """Up to ``n`` ids from the start of the validation part (one epoch, no wrap)."""
        stream = TokenStream(self.source, self.tokenizer, self.plan, "val")
        parts, total = [], 0
        for _, ids in stream._documents(0):
            parts.append(ids)
            total += len(ids)
            if total >= n:
                break
        if not parts:
            raise UserError(
                f"the validation part of data source {self.source.spec!r} holds no text; "
                "raise the validation fraction or give a dataset with a validation split"
            )
        return np.concatenate(parts)[:n]

    def batch_at(self, split: str, step: int, batch_size: int, seq_len: int, *, seed: int = 0):
        """Training batch number ``step``: steps come in order (the stream moves forward)."""
        if split != "train":
            raise ValueError("a stream draws training batches only; use eval_batches")
        if step != self.next_step:
            raise RuntimeError(f"stream is at batch {self.next_step}, asked for {step}")
        self.next_step += 1
        return self.train.next_batch(batch_size, seq_len)

    def eval_batches(self, batch_size: int, seq_len: int, max_tokens: int, split: str = "val"):
        """Consecutive windows from the start of the validation part, as ``TokenDataset``'s."""
        data = self._val_tokens(max(max_tokens, seq_len) + 1)
        if len(data) < seq_len + 1:
            raise UserError(
                f"the validation part of {self.source.spec!r} has {len(data)} tokens, too few "
                f"for seq_len={seq_len}; raise the validation fraction or shorten --seq-len"
            )
        n_windows = max(1, min((len(data) - 1) // seq_len, max_tokens // seq_len))
        for first in range(0, n_windows, batch_size):
            rows = range(first, min(first + batch_size, n_windows))
            window = np.stack([data[r * seq_len : r * seq_len + seq_len + 1] for r in rows])
            t = torch.from_numpy(window)
            yield t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"next_batch": self.next_step, **self.train.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train.load_state_dict(state)
        self.next_step = int(state["next_batch"])


def open_validation(
    data: str | None, tokenizer: Tokenizer, val_fraction: float = 0.02, seed: int = 0
) -> StreamingDataset | TokenDataset:
    """The data a run validated on, for ``eval_batches``: an ``hf:`` source's stream (the same
    held-out documents as in training), the token shards of any other source."""
    shards = data is not None and (Path(str(data)) / "manifest.json").is_file()
    if not shards and is_streamed(resolve_source(data)):
        return StreamingDataset(data, tokenizer, val_fraction, seed)
    return prepare_dataset(data, tokenizer, val_fraction=val_fraction, seed=seed)


def check_training_inputs(data: str | None, tokenizer: str | None) -> dict[str, Any]:
    """Resolve a training run's data and tokenizer before any work: a dataset name that does
    not resolve (or no network to resolve it), a tokenizer that does not load, a missing path:
    one-line ``UserError``. Downloads only the tokenizer (a Hub ``tokenizer.json``); a
    streamed dataset is only resolved (its split names). Returns what was resolved."""
    shards = data is not None and (Path(str(data)) / "manifest.json").is_file()
    resolved: dict[str, Any] = {"data": data, "tokenizer": tokenizer}
    if not shards:
        source = resolve_source(data)
        resolved["source"] = source.kind
        if is_streamed(source):
            resolved["splits"] = list(dataset_splits(source))
    if tokenizer is not None and not str(tokenizer).startswith("bpe:"):
        # bpe:N is trained on the data just checked; anything else loads now.
        tok = get_tokenizer(tokenizer)
        resolved["vocab_size"] = tok.vocab_size
    return resolved
