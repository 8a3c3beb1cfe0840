"""Text sources: the embedded corpus, local files and folders, Hugging Face datasets.

A source yields documents (strings); the shard builder puts an end-of-document id after each.
Documents per file kind: a ``.txt`` file is one document; each line of a ``.jsonl`` file and
each row of a ``.parquet`` file is one (its ``text`` field); each record of a Hugging Face
dataset split is one. Every source has an ``identity()``: a digest of what decides its
content (file names, sizes and modification times; the asset's sha256; the dataset's name,
config, split and fingerprint) that token-shard manifests record.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hcomposer.errors import UserError

__all__ = [
    "Source",
    "resolve_source",
    "embedded_corpus_text",
    "embedded_corpus_documents",
    "EMBEDDED_CORPUS",
    "TEXT_SUFFIXES",
    "stream_hf",
    "rehearsal_assets",
    "check_hub",
]

EMBEDDED_CORPUS = "austen.jsonl.xz"
REHEARSAL = "rehearsal"
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
# How many bytes of each file are checked for binary content before tokenising.
_SNIFF = 1 << 16
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# ``datasets`` raises many kinds (offline, unknown name, bad config, gated): these words in
# its message mean the network or the Hub was not reached.
_OFFLINE_HINTS = ("offline", "connection", "reach", "network", "timed out", "localentrynotfound")
_PROBE_SECONDS = 5.0


def _asset_bytes() -> bytes:
    return resources.files("hcomposer.assets").joinpath(EMBEDDED_CORPUS).read_bytes()


@lru_cache(maxsize=1)
def _embedded_records() -> tuple[dict, ...]:
    raw = lzma.decompress(_asset_bytes()).decode("utf-8")
    return tuple(json.loads(line) for line in raw.splitlines() if line.strip())


def embedded_corpus_documents() -> list[str]:
    """The shipped corpus as documents: Jane Austen's six novels (public domain, see NOTICE)."""
    return [r["text"] for r in _embedded_records()]


def rehearsal_assets() -> tuple[Path, Path]:
    """``(corpus folder, tokenizer.json)`` of the shipped rehearsal fixtures: a Hub-style
    Parquet dataset (``--data hf:<folder>``) and a Llama-3-style byte-level BPE of 1,024 ids
    (``--tokenizer <file>``), made by ``scripts/make_rehearsal_fixtures.py``."""
    root = Path(str(resources.files("hcomposer.assets").joinpath(REHEARSAL)))
    return root / "corpus", root / "tokenizer.json"


def embedded_corpus_text() -> str:
    """The shipped corpus as one string (novels separated by a blank line), about 4 MB."""
    return "\n\n".join(embedded_corpus_documents())


@dataclass(frozen=True)
class Source:
    """Where documents come from: ``kind`` is ``embedded``, ``files`` or ``hf``."""

    kind: str
    spec: str
    files: tuple[Path, ...] = ()
    hf: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the source."""
        if self.kind == "embedded":
            return {
                "kind": "embedded",
                "name": EMBEDDED_CORPUS,
                "sha256": hashlib.sha256(_asset_bytes()).hexdigest(),
            }
        if self.kind == "files":
            return {
                "kind": "files",
                "spec": self.spec,
                "files": [
                    {"path": str(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                    for p in self.files
                ],
            }
        # Streamed: nothing is read to describe it. A local copy adds its files' sizes and
        # times (an edit shows); a Hub dataset is named by repository, config and split.
        local = Path(self.hf["name"])
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else []
        files = [local] if local.is_file() else files
        return {
            "kind": "hf",
            "spec": self.spec,
            **self.hf,
            "files": [
                {"path": str(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                for p in files
            ],
        }

    def identity(self) -> str:
        blob = json.dumps(self.describe(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def documents(self) -> Iterator[str]:
        """Every document of the source, in a fixed order (an ``hf:`` source is streamed)."""
        if self.kind == "embedded":
            yield from embedded_corpus_documents()
        elif self.kind == "files":
            for p in self.files:
                yield from _file_documents(p)
        else:
            ds = stream_hf(self, self.hf.get("split", "train"))
            if ds.column_names is not None and "text" not in ds.column_names:
                raise UserError(f"dataset {self.spec!r} has no 'text' column ({ds.column_names})")
            for rec in ds:
                text = rec.get("text")
                if isinstance(text, str) and text:
                    yield text


def resolve_source(source: str | Path | None) -> Source:
    """Check a source and list its files. ``None`` is the embedded corpus; ``hf:NAME[:CONFIG]``
    (optionally ``@SPLIT``) is a Hugging Face dataset (a hub name when online, or a local
    folder that ``datasets.load_dataset`` reads); anything else is a local file or folder."""
    if source is None or str(source) in ("", "embedded"):
        return Source(kind="embedded", spec="embedded")
    text = str(source)
    if text.startswith("hf:"):
        rest = text[3:]
        split = "train"
        if "@" in rest:
            rest, split = rest.rsplit("@", 1)
        # A local folder may itself contain ':' rarely; prefer the path when it exists.
        if Path(rest).exists():
            name, config = rest, None
        else:
            name, _, config = rest.partition(":")
            config = config or None
        if not name:
            raise UserError(f"data source {text!r}: write hf:NAME[:CONFIG][@SPLIT]")
        return Source(kind="hf", spec=text, hf={"name": name, "config": config, "split": split})
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"data path {text!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"data folder {text!r} holds no {', '.join(TEXT_SUFFIXES)} files")
    else:
        if path.suffix not in TEXT_SUFFIXES:
            raise UserError(
                f"data file {text!r}: unknown kind {path.suffix or '(no suffix)'!r}; "
                f"use {', '.join(TEXT_SUFFIXES)} or a folder of them"
            )
        files = [path]
    for p in files:
        _check_file(p)
    return Source(kind="files", spec=str(path.resolve()), files=tuple(p.resolve() for p in files))


def _check_file(path: Path) -> None:
    """Refuse empty and binary files before anything is tokenised or written."""
    if path.stat().st_size == 0:
        raise UserError(f"data file {str(path)!r} is empty")
    if path.suffix == ".parquet":
        return
    with open(path, "rb") as f:
        head = f.read(_SNIFF)
    if b"\x00" in head:
        raise UserError(f"data file {str(path)!r} looks binary (NUL bytes); give UTF-8 text")
    try:
        # A multi-byte character may be cut at the end of the sniffed block: ignore that tail.
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:
            raise UserError(
                f"data file {str(path)!r} is not UTF-8 text (bad byte at offset {e.start})"
            ) from None
    if not head.strip():
        raise UserError(f"data file {str(path)!r} holds only whitespace")


def _file_documents(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"data file {str(path)!r} is not UTF-8 text: {e.reason}") from None
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{str(path)!r} line {n} is not valid JSON") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise UserError(f"{str(path)!r} line {n} has no string field 'text'")
                if rec["text"]:
                    yield rec["text"]
    else:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid for non-parquet bytes
            raise UserError(f"{str(path)!r} is not a readable Parquet file: {e}") from None
        if "text" not in pf.schema_arrow.names:
            raise UserError(f"{str(path)!r} has no 'text' column ({pf.schema_arrow.names})")
        for batch in pf.iter_batches(columns=["text"], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text:
                    yield text


def _hf_error(spec: str, e: Exception) -> UserError:
    first = (str(e).splitlines() or [type(e).__name__])[0][:200] or type(e).__name__
    if any(h in first.lower() for h in _OFFLINE_HINTS) or "offline" in type(e).__name__.lower():
        return UserError(
            f"dataset {spec!r} could not be reached (no network, or HF_DATASETS_OFFLINE=1): "
            f"{first}; offline, give a local copy: --data hf:PATH (a datasets folder, "
            ".jsonl or .parquet files) or a local text path"
        )
    return UserError(f"dataset {spec!r} could not be loaded: {first}")


def stream_hf(source: Source, split: str | None):
    """An ``hf:`` source as ``datasets`` streams it (a dict of splits when ``split`` is None):
    a Hub name, a local Hub-style folder, ``.jsonl``/``.parquet`` files or a folder written by
    ``save_to_disk``. Errors are one line; offline ones name the local alternative."""
    import datasets

    name, config = source.hf["name"], source.hf.get("config")
    path = Path(name)
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise UserError(
                    f"data file {name!r}: use .jsonl or .parquet (or a datasets folder)"
                )
            ds = datasets.load_dataset(
                builder, data_files={"train": str(path)}, split=split, streaming=True
            )
        elif (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            # A folder written by Dataset(Dict).save_to_disk: Arrow files read lazily.
            saved = datasets.load_from_disk(str(path))
            if isinstance(saved, datasets.DatasetDict):
                ds = {k: v.to_iterable_dataset() for k, v in saved.items()}
                ds = ds if split is None else ds[split]
            else:
                ds = saved.to_iterable_dataset() if split in (None, "train") else None
                ds = {"train": ds} if split is None else ds
            if ds is None:
                raise KeyError(split)
        else:
            if not path.exists():
                check_hub(f"dataset {source.spec!r}", "a local copy: --data hf:PATH (a datasets "
                          "folder, .jsonl or .parquet files) or a local text path")  # fmt: skip
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except UserError:
        raise
    except KeyError:
        raise UserError(f"dataset {source.spec!r} has no split {split!r}") from None
    except Exception as e:
        raise _hf_error(source.spec, e) from None
    return ds


@lru_cache(maxsize=1)
def _hub_reached() -> str | None:
    """None when the Hub answers a TCP connection within a few seconds, else why not."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=_PROBE_SECONDS).close()
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or type(e).__name__})"
    return None


def check_hub(what: str, local: str) -> None:
    """Before fetching ``what`` from the Hub: a one-line error at once when there is no network
    (rather than minutes of retries), naming the ``local`` alternative. Offline mode
    (``HF_HUB_OFFLINE=1``/``HF_DATASETS_OFFLINE=1``) reads the local cache: not probed."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):  # fmt: skip
        return
    why = _hub_reached()
    if why is not None:
        raise UserError(
            f"{what} needs the Hugging Face Hub, but {why}; offline, pass {local} (or set "
            "HF_HUB_OFFLINE=1 to use a copy already in the Hub cache)"
        )
