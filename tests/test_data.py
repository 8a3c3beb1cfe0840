"""Text data: tokenizers, sources, token shards (manifest reuse/rebuild, split, batches)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hcomposer.data import (
    ByteTokenizer,
    embedded_corpus_documents,
    embedded_corpus_text,
    get_tokenizer,
    load_tokenizer,
    prepare_dataset,
    resolve_source,
    train_bpe,
)
from hcomposer.errors import UserError

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


@pytest.fixture
def corpus(tmp_path):
    """A folder with one file of each kind (documents known in advance)."""
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("Émile wrote a letter.\n" * 40, encoding="utf-8")
    docs = [{"text": f"record {i}: " + TEXT} for i in range(30)]
    (d / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs))
    pq.write_table(pa.table({"text": [f"row {i} " + TEXT for i in range(20)]}), d / "c.parquet")
    return d


def test_embedded_corpus_is_large_public_domain_prose():
    text = embedded_corpus_text()
    assert len(text.encode("utf-8")) > 2_000_000
    docs = embedded_corpus_documents()
    assert len(docs) == 6 and "Elizabeth Bennet" in text and "Emma Woodhouse" in text
    # Cleaning removed the italics markers and joined wrapped lines into paragraphs.
    assert "_" not in text
    assert max(len(p) for p in docs[0].split("\n\n")) > 500


def test_byte_tokenizer_round_trip_and_eos():
    tok = get_tokenizer("byte")
    ids = tok.encode("naïve ☃")
    assert ids == list("naïve ☃".encode())
    assert tok.decode(ids + [tok.eos_id]) == "naïve ☃"
    assert tok.vocab_size == 257 and tok.eos_id == 256


def test_bpe_training_save_load_and_cache(tmp_path):
    tok = train_bpe(320, [TEXT * 3, "another document about fortune and a wife"] * 5)
    ids = tok.encode(TEXT)
    assert len(ids) < len(TEXT.encode())  # merges happened
    assert tok.decode(ids) == TEXT
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.identity == tok.identity and again.encode(TEXT) == ids
    # get_tokenizer("bpe:N") trains once on the source, then reuses the cached files.
    src = tmp_path / "s.txt"
    src.write_text((TEXT + "\n") * 50)
    a = get_tokenizer("bpe:300", source=str(src), cache_dir=tmp_path / "cache")
    b = get_tokenizer("bpe:300", source=str(src), cache_dir=tmp_path / "cache")
    assert a.identity == b.identity and a.vocab_size == 300
    # A tokenizer.json path and a saved folder both load.
    assert get_tokenizer(str(tmp_path / "tok" / "tokenizer.json")).identity == tok.identity
    assert get_tokenizer(str(tmp_path / "tok")).identity == tok.identity


def test_hf_tokenizer_without_eos_gets_one(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = get_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.eos_id == 3 and tok.vocab_size == 4
    assert tok.encode("a b a") == [0, 1, 0]


def test_sources_list_files_and_documents(corpus):
    src = resolve_source(str(corpus))
    assert [p.name for p in src.files] == ["a.txt", "b.jsonl", "c.parquet"]
    docs = list(src.documents())
    assert len(docs) == 1 + 30 + 20
    assert docs[1] == "record 0: " + TEXT and docs[-1] == "row 19 " + TEXT


def test_shards_pack_documents_with_eos_and_split(corpus, tmp_path):
    tok = ByteTokenizer()
    ds = prepare_dataset(str(corpus), tok, cache_dir=tmp_path / "cache", val_fraction=0.1)
    m = ds.manifest
    assert m["documents"] == 51 and m["dtype"] == "uint16"
    expected = sum(len(d.encode()) + 1 for d in resolve_source(str(corpus)).documents())
    assert m["tokens"]["train"] + m["tokens"]["val"] == expected
    assert 0 < m["tokens"]["val"] < expected
    # Splits concatenated in block order give back the packed stream: here val was cut
    # from the start (the corpus is smaller than one split block).
    stream = np.concatenate([ds.val, ds.train])
    assert (stream == tok.eos_id).sum() == 51
    first_doc = resolve_source(str(corpus)).documents().__next__()
    assert tok.decode(stream[: len(first_doc.encode())].tolist()) == first_doc


def test_shards_reused_then_rebuilt_when_source_changes(corpus, tmp_path):
    tok = ByteTokenizer()
    cache = tmp_path / "cache"
    ds = prepare_dataset(str(corpus), tok, cache_dir=cache)
    manifest = ds.path / "manifest.json"
    mtime = manifest.stat().st_mtime_ns
    again = prepare_dataset(str(corpus), tok, cache_dir=cache)
    assert again.path == ds.path and manifest.stat().st_mtime_ns == mtime
    # Same path, new content: the manifest no longer matches and the shards are rebuilt.
    time.sleep(0.01)
    f = corpus / "a.txt"
    f.write_text("Different text now.\n" * 10)
    os.utime(f, ns=(time.time_ns(), time.time_ns()))
    rebuilt = prepare_dataset(str(corpus), tok, cache_dir=cache)
    assert rebuilt.path == ds.path and manifest.stat().st_mtime_ns != mtime
    assert sum(rebuilt.n_tokens.values()) != sum(ds.n_tokens.values())
    assert rebuilt.manifest["documents"] == 51
    assert tok.decode(np.concatenate([rebuilt.val, rebuilt.train])[:20].tolist()) == (
        "Different text now.\n"
    )
    # Nothing half-built is left beside the entry, only its lock file (kept: see entry_lock).
    hidden = {p.name for p in (cache / "tokens").iterdir() if p.name.startswith(".")}
    assert hidden == {f".{ds.path.name}.lock"}


def test_shard_folder_as_source_refuses_other_tokenizer(corpus, tmp_path):
    ds = prepare_dataset(str(corpus), ByteTokenizer(), cache_dir=tmp_path / "cache")
    assert prepare_dataset(str(ds.path), ByteTokenizer()).n_tokens == ds.n_tokens
    bpe = train_bpe(300, [TEXT] * 10)
    before = {p.name: p.stat().st_mtime_ns for p in ds.path.iterdir()}
    with pytest.raises(UserError, match="made with tokenizer 'byte'"):
        prepare_dataset(str(ds.path), bpe)
    assert {p.name: p.stat().st_mtime_ns for p in ds.path.iterdir()} == before
    # A tampered shard fails its checksum.
    with open(ds.path / "val.bin", "r+b") as f:
        f.write(b"\x01\x02")
    with pytest.raises(UserError, match="checksum"):
        prepare_dataset(str(ds.path), ByteTokenizer())


def test_batches_are_deterministic_and_shifted(corpus, tmp_path):
    ds = prepare_dataset(str(corpus), ByteTokenizer(), cache_dir=tmp_path / "cache")
    it = ds.batches("train", 3, 16, seed=5)
    first = [next(it) for _ in range(4)]
    resumed = ds.batches("train", 3, 16, seed=5, start_step=2)
    for (x, y), (x2, y2) in zip(first[2:], [next(resumed), next(resumed)]):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    x, y = first[0]
    assert x.shape == (3, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    other = next(ds.batches("train", 3, 16, seed=6))[0]
    assert not torch.equal(other, x)
    windows = list(ds.eval_batches(2, 16, 64))
    assert sum(w[0].shape[0] for w in windows) == 4
    assert torch.equal(windows[0][0][0], torch.from_numpy(ds.val[:16].astype(np.int64)))


def test_hf_datasets_path_offline_on_local_files(tmp_path):
    d = tmp_path / "hfdata"
    d.mkdir()
    pq.write_table(pa.table({"text": [f"doc {i} " + TEXT for i in range(12)]}), d / "x.parquet")
    src = resolve_source(f"hf:{d}")
    assert src.kind == "hf"
    docs = list(src.documents())
    assert docs[0] == "doc 0 " + TEXT and len(docs) == 12
    ds = prepare_dataset(f"hf:{d}", ByteTokenizer(), cache_dir=tmp_path / "cache")
    assert ds.manifest["documents"] == 12 and ds.manifest["source"]["kind"] == "hf"


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", b"", "is empty"),
        ("blob.txt", b"\x00\x01\x02binary\x00", "binary"),
        ("latin.txt", "caf\xe9 ".encode("latin-1") * 50, "not UTF-8"),
        ("bad.jsonl", b'{"body": "no text field"}\n', "no string field 'text'"),
        ("notes.md", b"# words", "unknown kind"),
    ],
)
def test_bad_sources_are_user_errors(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=match):
        prepare_dataset(str(path), ByteTokenizer(), cache_dir=cache)
    assert not cache.exists() or not any((cache / "tokens").iterdir())
