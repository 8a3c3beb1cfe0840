"""Options several commands share, each written once: the forms a data source and a tokenizer
take, and the output switches (``--json``, ``--no-progress``)."""

from __future__ import annotations

import argparse

__all__ = ["DATA_FORMS", "TOKENIZER_FORMS", "add_data", "add_tokenizer", "add_output"]

DATA_FORMS = (
    "a text file or folder, a token-shard folder, or hf:NAME[:CONFIG][@SPLIT] (a Hub dataset, "
    "streamed; or a local datasets folder, .jsonl or .parquet file)"
)
TOKENIZER_FORMS = (
    "byte, bpe:N (trained on the data), hf:OWNER/NAME (a Hub tokenizer.json) or a "
    "tokenizer.json path"
)


def add_data(p: argparse.ArgumentParser, default: str, what: str = "training text") -> None:
    """``--data``: ``what``, in any of the source forms; ``default`` says what None means."""
    p.add_argument("--data", default=None, help=f"{what}: {DATA_FORMS} (default: {default})")


def add_tokenizer(p: argparse.ArgumentParser, default: str | None, note: str) -> None:
    """``--tokenizer`` with ``default`` (None: ``note`` says whose is used)."""
    p.add_argument("--tokenizer", default=default, help=f"{TOKENIZER_FORMS} (default: {note})")


def add_output(p: argparse.ArgumentParser, progress: str | None = "no progress bar") -> None:
    """``--no-progress`` (with ``progress`` as its help; None: the command has no bar) and
    ``--json``."""
    if progress is not None:
        p.add_argument("--no-progress", action="store_true", help=progress)
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
