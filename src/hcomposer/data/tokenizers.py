"""Tokenizers: byte-level (default), a local Hugging Face ``tokenizer.json``, or a BPE trained here.

Every tokenizer has an end-of-document id (``eos_id``) that the shards put between documents,
a ``name`` for people and an ``identity`` (sha256 of what decides its output) that token
shards and runs record, so shards made with one tokenizer are never read with another.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hcomposer.data.sources import check_hub, resolve_source
from hcomposer.errors import UserError
from hcomposer.io import atomic_write_json, atomic_write_text, entry_lock, pick, read_json

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "get_tokenizer",
    "train_bpe",
    "load_tokenizer",
    "EOS_TOKEN",
]

EOS_TOKEN = "<|endoftext|>"
# Special tokens that already mean "end of document" in common tokenizer.json files.
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
_CONFIG = "tokenizer_config.json"
# A BPE trained on a streamed corpus reads its first BPE_TEXT_CHARS characters (about 250M
# tokens of English): enough for a 32K-128K vocabulary, and minutes rather than days of
# reading a 10B-token web sample.
BPE_TEXT_CHARS = 1_000_000_000


class Tokenizer:
    """The interface every tokenizer offers (see the module docstring)."""

    kind: str = ""
    name: str = ""
    vocab_size: int = 0
    eos_id: int = 0

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    @property
    def identity(self) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return pick(self, "kind", "name", "vocab_size", "eos_id", "identity")

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer's files into ``directory`` (created if needed)."""
        atomic_write_json(Path(directory) / _CONFIG, self.to_dict())

    @staticmethod
    def load(directory: str | Path) -> Tokenizer:
        """The tokenizer that ``save`` wrote into ``directory``."""
        return load_tokenizer(directory)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 and id 256 as end of document: nothing to download."""

    kind = "byte"
    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # The EOS id (and anything out of range) has no bytes; invalid UTF-8 decodes as U+FFFD.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    @property
    def identity(self) -> str:
        return hashlib.sha256(b"hcomposer.byte/1").hexdigest()


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (from a local ``tokenizer.json`` or trained here)."""

    kind = "hf"

    def __init__(self, tok: Any, name: str):
        eos = next((t for t in _EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
        if eos is None:
            # No end-of-document token: add one, so documents stay separable in the shards.
            tok.add_special_tokens([EOS_TOKEN])
            eos = EOS_TOKEN
        self._tok = tok
        self._json = tok.to_str()
        self.eos_id = int(tok.token_to_id(eos))
        self.eos_token = eos
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self.name = name

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"tokenizer file {str(path)!r} does not exist")
        try:
            tok = _Tok.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception for bad JSON
            raise UserError(f"tokenizer file {str(path)!r} could not be read: {e}") from None
        return cls(tok, name or str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    @property
    def identity(self) -> str:
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()

    def save(self, directory: str | Path) -> None:
        atomic_write_text(Path(directory) / "tokenizer.json", self._json)
        super().save(directory)


def train_bpe(vocab_size: int, texts: Iterable[str]) -> HFTokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids (the EOS token included) on ``texts``."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise UserError(f"bpe:{vocab_size}: the vocabulary must hold at least 300 ids")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, f"bpe:{vocab_size}")


def _first_chars(texts: Iterable[str], limit: int) -> Iterable[str]:
    """The documents until ``limit`` characters have been given (the last one whole)."""
    seen = 0
    for text in texts:
        yield text
        seen += len(text)
        if seen >= limit:
            return


def cache_root() -> Path:
    env = os.environ.get("HCOMPOSER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hcomposer"


def _bpe(spec: str, source: str | None, cache_dir: Path | None) -> HFTokenizer:
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        raise UserError(
            f"tokenizer {spec!r}: write bpe:N with N an integer, e.g. bpe:4096"
        ) from None
    if source is not None and (Path(str(source)) / "manifest.json").is_file():
        made_with = read_json(Path(str(source)) / "manifest.json").get("tokenizer", {})
        raise UserError(
            f"token shards in {str(source)!r} were made with tokenizer {made_with.get('name')!r};"
            f" {spec} is trained on raw text: pass --tokenizer {made_with.get('name')} or give "
            "the raw text as --data"
        )
    src = resolve_source(source)
    # A trained BPE is cached by (vocab size, corpus identity): training is the slow part.
    key = hashlib.sha256(f"bpe/1|{n}|{src.identity()}".encode()).hexdigest()[:16]
    folder = Path(cache_dir or cache_root()) / "tokenizers" / f"bpe{n}-{key}"
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer.from_file(folder / "tokenizer.json", name=f"bpe:{n}")
    # Parallel jobs asking for this BPE train it once: the others wait, then read it.
    with entry_lock(folder):
        if (folder / "tokenizer.json").is_file():
            return HFTokenizer.from_file(folder / "tokenizer.json", name=f"bpe:{n}")
        tok = train_bpe(n, _first_chars(src.documents(), BPE_TEXT_CHARS))
        tok.save(folder)
    return tok


def get_tokenizer(
    spec: str | None = None, *, source: str | None = None, cache_dir: str | Path | None = None
) -> Tokenizer:
    """``"byte"`` (default), a path to a ``tokenizer.json`` (or a folder holding one, such as a
    run's ``tokenizer/``), ``"hf:OWNER/NAME"`` (a Hub repository's ``tokenizer.json``), or
    ``"bpe:N"``: a byte-level BPE of N ids trained on ``source``
    (the embedded corpus when None) and cached under ``cache_dir``."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        return _bpe(spec, source, Path(cache_dir) if cache_dir else None)
    if spec.startswith("hf:"):
        return _hub_tokenizer(spec)
    path = Path(spec)
    if path.is_dir() and (path / _CONFIG).is_file():
        return load_tokenizer(path)
    if path.suffix == ".json" or path.exists():
        return HFTokenizer.from_file(path)
    raise UserError(
        f"unknown tokenizer {spec!r}: use 'byte', 'bpe:N', hf:OWNER/NAME or a path to a "
        "tokenizer.json"
    )


def _hub_tokenizer(spec: str) -> HFTokenizer:
    """``hf:OWNER/NAME``: the repository's ``tokenizer.json``, fetched from the Hub on first use
    (then read from the Hub's local cache; ``HF_HUB_OFFLINE=1`` reads only that cache)."""
    repo = spec[3:]
    if Path(repo).exists():
        return HFTokenizer.from_file(repo, name=spec)
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"tokenizer {spec!r}: write hf:OWNER/NAME, e.g. hf:unsloth/Llama-3.2-1B")
    from huggingface_hub import hf_hub_download

    check_hub(f"tokenizer {spec!r}", "a local tokenizer.json: --tokenizer PATH")
    try:
        path = hf_hub_download(repo, "tokenizer.json")
    except Exception as e:  # offline, unknown or gated repository, no tokenizer.json
        kind = type(e).__name__
        if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            why = "not in the local Hub cache, and the Hub was not reached (no network?)"
        else:
            why = f"{kind}: {(str(e).splitlines() or [''])[0][:160]}"
        raise UserError(
            f"tokenizer {spec!r} could not be fetched ({why}); offline, or for a gated "
            "model, pass a local tokenizer.json: --tokenizer PATH"
        ) from None
    return HFTokenizer.from_file(path, name=spec)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load what ``Tokenizer.save`` wrote; checks the identity it recorded."""
    directory = Path(directory)
    cfg_path = directory / _CONFIG
    if not cfg_path.is_file():
        raise UserError(f"{str(directory)!r} holds no saved tokenizer ({_CONFIG} is missing)")
    try:
        cfg = read_json(cfg_path)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{str(cfg_path)!r} is not valid JSON: {e}") from None
    kind = cfg.get("kind")
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif kind == "hf":
        tok = HFTokenizer.from_file(directory / "tokenizer.json", name=cfg.get("name"))
    else:
        raise UserError(f"{str(cfg_path)!r}: unknown tokenizer kind {kind!r}")
    if cfg.get("identity") not in (None, tok.identity):
        raise UserError(f"tokenizer in {str(directory)!r} does not match its recorded identity")
    return tok
