"""Text data: tokenizers, sources (the embedded corpus, local files, HF datasets), token shards
and token streams.

The MAD and MQAR generators live in ``hcomposer.data.mad`` / ``hcomposer.data.mqar`` and are
imported from there, not from here.
"""

from hcomposer.data.shards import TokenDataset, load_token_folder, prepare_dataset
from hcomposer.data.sources import (
    Source,
    embedded_corpus_documents,
    embedded_corpus_text,
    rehearsal_assets,
    resolve_source,
)
from hcomposer.data.stream import StreamingDataset, TokenStream, is_streamed
from hcomposer.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    get_tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "get_tokenizer",
    "load_tokenizer",
    "train_bpe",
    "Source",
    "resolve_source",
    "embedded_corpus_text",
    "embedded_corpus_documents",
    "rehearsal_assets",
    "TokenDataset",
    "prepare_dataset",
    "load_token_folder",
    "StreamingDataset",
    "TokenStream",
    "is_streamed",
]
