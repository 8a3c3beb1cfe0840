"""Regenerate the rehearsal fixtures under ``src/hcomposer/assets/rehearsal/`` (deterministic).

    python scripts/make_rehearsal_fixtures.py [OUT]   # default: src/hcomposer/assets/rehearsal

Two small stand-ins, in the formats of the real parts the big recipes use:

- ``corpus/``: a Hub-style ``datasets`` repository (a dataset card ``README.md`` whose YAML
  names the Parquet shards of the ``train`` split, as web-text datasets on the Hub do), with
  one shard ``data/train-00000-of-00001.parquet`` of ``text`` records: passages of about 2,000
  characters cut at paragraph breaks from the embedded Austen corpus (public domain). Only a
  ``train`` split, so the hash-of-document validation split is what a rehearsal exercises.
- ``tokenizer.json``: a Llama-3-style byte-level BPE (the same pre-tokeniser regex and
  byte-level alphabet, ``<|begin_of_text|>`` / ``<|end_of_text|>`` specials, BOS added by the
  post-processor) of ``VOCAB`` entries, trained here with ``tokenizers`` on that corpus.

Same inputs, same library versions: same bytes (the test ``tests/test_rehearsal_fixtures.py``
regenerates both into a temporary folder and compares their content with the committed ones).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from hcomposer.data.sources import embedded_corpus_documents

VOCAB = 1024
PASSAGE_CHARS = 2000
N_PASSAGES = 120
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SHARD = "data/train-00000-of-00001.parquet"
# Llama 3's pre-tokeniser split: contractions, letter runs, up to three digits, punctuation
# runs, newlines, spaces (written out here from its published description).
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CARD = """---
license: pd
language:
- en
pretty_name: hcomposer rehearsal corpus
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
dataset_info:
  features:
  - name: text
    dtype: string
  - name: id
    dtype: string
---

# hcomposer rehearsal corpus

{n} passages of about {chars} characters from Jane Austen's novels (public domain; see the
package's NOTICE), cut at paragraph breaks, in the layout of a web-text dataset on the Hub
(Parquet shards with a `text` column). Made by `scripts/make_rehearsal_fixtures.py`; used by
the tests and by rehearsals in place of a real corpus.
"""


def passages() -> list[dict[str, str]]:
    """``N_PASSAGES`` records, taken in turn from each novel's start."""
    per_novel: list[list[str]] = []
    for novel in embedded_corpus_documents():
        chunks, cur = [], ""
        for para in novel.split("\n\n"):
            cur = f"{cur}\n\n{para}" if cur else para
            if len(cur) >= PASSAGE_CHARS:
                chunks.append(cur)
                cur = ""
        per_novel.append(chunks)
    out: list[dict[str, str]] = []
    k = 0
    while len(out) < N_PASSAGES:
        for n, chunks in enumerate(per_novel):
            if k < len(chunks) and len(out) < N_PASSAGES:
                out.append({"text": chunks[k], "id": f"austen-{n}-{k:04d}"})
        k += 1
    return out


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """The Llama-3-style byte-level BPE of ``VOCAB`` entries (specials included)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def build(out: Path) -> None:
    records = passages()
    corpus = out / "corpus"
    (corpus / "data").mkdir(parents=True, exist_ok=True)
    table = pa.table({"text": [r["text"] for r in records], "id": [r["id"] for r in records]})
    pq.write_table(table, corpus / SHARD, compression="zstd", row_group_size=32)
    card = CARD.format(n=len(records), chars=PASSAGE_CHARS)
    (corpus / "README.md").write_text(card, encoding="utf-8")
    tok = train_tokenizer([r["text"] for r in records])
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1] / "src/hcomposer/assets/rehearsal"
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
