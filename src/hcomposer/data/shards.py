"""Packed, memory-mapped token shards with a manifest, and deterministic batches from them.

A prepared dataset is a folder holding ``train.bin`` and ``val.bin`` (raw little-endian
uint16 when the vocabulary fits, else uint32; documents packed back to back, each followed by
the tokenizer's EOS id) and ``manifest.json`` (source description, tokenizer identity, split
rule, token counts, sha256 of each shard). It is built once into a temporary folder and
renamed into place, so a killed build leaves nothing half-written, and under a lock beside
the folder (:func:`hcomposer.io.entry_lock`), so parallel jobs build it once. It is reused
when the stored manifest's source, tokenizer and split agree with the request, rebuilt
otherwise.

Split: the token stream is cut into blocks of ``SPLIT_BLOCK`` tokens and a block goes to
validation when a hash of (seed, block index) falls below ``val_fraction``; at least one block
is always held out. The split therefore depends only on the stream, the seed and the fraction.

A folder with a ``manifest.json`` may also be given as the data source itself; its tokenizer
must then be the one asked for (``UserError`` otherwise: it is never silently rebuilt, since
the raw text may not be at hand).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hcomposer.data.sources import resolve_source
from hcomposer.data.tokenizers import Tokenizer, cache_root
from hcomposer.errors import UserError
from hcomposer.io import atomic_write_json, entry_lock, read_json, sha256_file

__all__ = ["TokenDataset", "prepare_dataset", "load_token_folder", "SPLIT_BLOCK", "FORMAT"]

FORMAT = "hcomposer.tokens/1"
SPLIT_BLOCK = 8192
_ENCODE_BATCH = 64
_SPLITS = ("train", "val")


@dataclass
class TokenDataset:
    """Token ids of a prepared dataset: ``train``/``val`` are 1-D numpy memmaps."""

    path: Path
    manifest: dict[str, Any]
    train: np.ndarray
    val: np.ndarray

    def split(self, name: str) -> np.ndarray:
        if name not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {name!r}")
        return self.train if name == "train" else self.val

    def check_len(self, data: np.ndarray, split: str, seq_len: int) -> None:
        if len(data) < seq_len + 2:
            raise UserError(
                f"the {split} split has {len(data)} tokens, too few for seq_len={seq_len}; "
                "use more data, a shorter --seq-len or a larger validation fraction"
            )

    def batch_at(
        self, split: str, step: int, batch_size: int, seq_len: int, *, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``step``: ``batch_size`` random windows drawn from a generator seeded by
        (seed, step, split) alone, so any step can be recomputed (exact resume, DDP slicing)."""
        data = self.split(split)
        self.check_len(data, split, seq_len)
        rng = np.random.default_rng([seed, step, _SPLITS.index(split)])
        starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
        idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
        window = torch.from_numpy(data[idx].astype(np.int64))
        return window[:, :-1], window[:, 1:]

    def batches(
        self,
        split: str,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        start_step: int = 0,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless ``(x, y)`` LongTensors [B, T] (y is x shifted by one) from ``start_step`` on."""
        step = start_step
        while True:
            yield self.batch_at(split, step, batch_size, seq_len, seed=seed)
            step += 1

    def eval_batches(
        self, batch_size: int, seq_len: int, max_tokens: int, split: str = "val"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows from the start of ``split``, up to ``max_tokens``
        target tokens (at least one window): the same tokens at every evaluation."""
        data = self.split(split)
        self.check_len(data, split, seq_len)
        n_windows = max(1, min((len(data) - 1) // seq_len, max_tokens // seq_len))
        for first in range(0, n_windows, batch_size):
            rows = range(first, min(first + batch_size, n_windows))
            window = np.stack([data[r * seq_len : r * seq_len + seq_len + 1] for r in rows])
            t = torch.from_numpy(window.astype(np.int64))
            yield t[:, :-1], t[:, 1:]

    @property
    def n_tokens(self) -> dict[str, int]:
        return {"train": int(len(self.train)), "val": int(len(self.val))}


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _open(folder: Path, manifest: dict) -> TokenDataset:
    dtype = np.dtype(manifest["dtype"])
    arrays = {}
    for split in _SPLITS:
        path = folder / f"{split}.bin"
        n = manifest["tokens"][split]
        if not path.is_file() or path.stat().st_size != n * dtype.itemsize:
            raise UserError(f"token shard {str(path)!r} is missing or truncated; delete {folder}")
        arrays[split] = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    return TokenDataset(path=folder, manifest=manifest, train=arrays["train"], val=arrays["val"])


def _request(source, tokenizer: Tokenizer, val_fraction: float, seed: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "source": source.describe(),
        "tokenizer": tokenizer.to_dict(),
        "split": {
            "rule": "hash-blocks",
            "block": SPLIT_BLOCK,
            "val_fraction": val_fraction,
            "seed": seed,
        },
        "dtype": _dtype_for(tokenizer.vocab_size).name,
    }


def _matches(stored: dict, request: dict) -> bool:
    return all(stored.get(k) == v for k, v in request.items())


def load_token_folder(folder: str | Path, tokenizer: Tokenizer, *, verify: bool = True):
    """A folder already holding shards and a manifest; refuses another tokenizer's shards."""
    folder = Path(folder)
    try:
        manifest = read_json(folder / "manifest.json")
    except (OSError, ValueError) as e:
        raise UserError(f"{str(folder)!r}: manifest.json cannot be read: {e}") from None
    made_with = manifest.get("tokenizer", {})
    if made_with.get("identity") != tokenizer.identity:
        raise UserError(
            f"token shards in {str(folder)!r} were made with tokenizer "
            f"{made_with.get('name')!r}, not {tokenizer.name!r}; pass --tokenizer "
            f"{made_with.get('name')} or give the raw text as --data"
        )
    if verify:
        for split in _SPLITS:
            if sha256_file(folder / f"{split}.bin") != manifest["sha256"][split]:
                raise UserError(f"token shard {split}.bin in {str(folder)!r} fails its checksum")
    return _open(folder, read_json(folder / "manifest.json"))


def _val_block(seed: int, index: int, val_fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2.0**64 < val_fraction


def _token_stream(source, tokenizer: Tokenizer, dtype: np.dtype) -> Iterator[np.ndarray]:
    """Each document's ids followed by EOS, encoded in batches."""
    batch: list[str] = []
    docs = iter(source.documents())
    while True:
        doc = next(docs, None)
        if doc is not None:
            batch.append(doc)
        if batch and (doc is None or len(batch) >= _ENCODE_BATCH):
            for ids in tokenizer.encode_batch(batch):
                arr = np.empty(len(ids) + 1, dtype=dtype)
                arr[:-1] = ids
                arr[-1] = tokenizer.eos_id
                yield arr
            batch = []
        if doc is None:
            return


def _build(source, tokenizer: Tokenizer, request: dict, tmp: Path) -> dict[str, Any]:
    dtype = np.dtype(request["dtype"])
    val_fraction = request["split"]["val_fraction"]
    seed = request["split"]["seed"]
    counts = {s: 0 for s in _SPLITS}
    n_docs = 0
    block_index = 0
    pending = np.zeros(0, dtype)
    with ExitStack() as stack:
        files = {s: stack.enter_context(open(tmp / f"{s}.bin", "wb")) for s in _SPLITS}

        def write_blocks(stream: np.ndarray, final: bool) -> np.ndarray:
            nonlocal block_index
            cut = len(stream) if final else (len(stream) // SPLIT_BLOCK) * SPLIT_BLOCK
            for lo in range(0, cut, SPLIT_BLOCK):
                block = stream[lo : min(lo + SPLIT_BLOCK, cut)]
                split = "val" if _val_block(seed, block_index, val_fraction) else "train"
                files[split].write(block.tobytes())
                counts[split] += len(block)
                block_index += 1
            return stream[cut:]

        parts: list[np.ndarray] = []
        n_parts = 0
        for arr in _token_stream(source, tokenizer, dtype):
            parts.append(arr)
            n_parts += len(arr)
            n_docs += 1
            if n_parts >= 16 * SPLIT_BLOCK:
                pending = write_blocks(np.concatenate([pending, *parts]), final=False)
                parts, n_parts = [], 0
        write_blocks(np.concatenate([pending, *parts]), final=True)
    if n_docs == 0:
        raise UserError(f"data source {source.spec!r} holds no text")
    if counts["val"] == 0 or counts["train"] == 0:
        # Too little data for the hash to pick a mix of blocks (a corpus of a few blocks):
        # hold out the first tokens instead (a tenth at least, so a short window fits).
        stream = np.concatenate(
            [np.fromfile(tmp / f"{s}.bin", dtype=dtype) for s in ("val", "train")]
        )
        n = min(SPLIT_BLOCK, max(int(len(stream) * val_fraction), len(stream) // 10, 1))
        stream[:n].tofile(tmp / "val.bin")
        stream[n:].tofile(tmp / "train.bin")
        counts = {"train": len(stream) - n, "val": n}
    return {
        **request,
        "documents": n_docs,
        "tokens": counts,
        "sha256": {s: sha256_file(tmp / f"{s}.bin") for s in _SPLITS},
    }


def prepare_dataset(
    source: str | Path | None,
    tokenizer: Tokenizer,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.02,
    seed: int = 0,
) -> TokenDataset:
    """Tokenise ``source`` (None: the embedded corpus) once into shards under ``cache_dir``
    (default ``$HCOMPOSER_CACHE`` or ``~/.cache/hcomposer``) and open them.

    ``source`` may also be a folder that already holds shards (see the module docstring).
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if source is not None and (Path(str(source)) / "manifest.json").is_file():
        return load_token_folder(source, tokenizer)
    src = resolve_source(source)
    request = _request(src, tokenizer, val_fraction, seed)
    # The folder is named by what the user asked for (source spec, tokenizer, split); the
    # manifest inside also records the files' sizes and times, so an edited source maps to
    # the same folder, fails the match below and is rebuilt in place.
    key = hashlib.sha256(
        repr((src.kind, src.spec, tokenizer.identity, request["split"])).encode()
    ).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    folder = root / "tokens" / f"{src.kind}-{key}"
    found = _cached(folder, request)
    if found is not None:
        return found
    # Parallel jobs (search workers, DDP ranks, two runs) asking for these shards build them
    # once: the others wait for the lock and then find them.
    with entry_lock(folder):
        found = _cached(folder, request)
        if found is not None:
            return found
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            manifest = _build(src, tokenizer, request, tmp)
            atomic_write_json(tmp / "manifest.json", manifest)
            _install(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _open(folder, read_json(folder / "manifest.json"))


def _cached(folder: Path, request: dict) -> TokenDataset | None:
    """The shards in ``folder`` if its manifest matches ``request``, else None."""
    if not (folder / "manifest.json").is_file():
        return None
    try:
        stored = read_json(folder / "manifest.json")
        if _matches(stored, request):
            return _open(folder, stored)
    except (OSError, ValueError, KeyError, UserError):
        pass
    return None


def _install(tmp: Path, folder: Path) -> None:
    """Rename the finished build into place; stale shards are moved aside first."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except OSError:
        # Another process (a DDP rank) installed the same build first: keep theirs.
        if not (folder / "manifest.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
