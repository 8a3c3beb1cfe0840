"""Options several commands share, each written once: the forms a data source and a tokenizer
take, and the output switches (``--json``, ``--no-progress``)."""

from __future__ import annotations

import argparse

from hcomposer.errors import UserError

__all__ = ["DATA_FORMS", "TOKENIZER_FORMS", "add_data", "add_tokenizer", "add_output", "int_list"]

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


def int_list(text: str, flag: str, least: int) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``, the value of option ``flag``: one whole number at least,
    none below ``least`` (else a UserError naming the option)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(
            f"{flag} {text!r}: write comma-separated whole numbers, e.g. {least},{least + 1}"
        ) from None
    if not values or min(values) < least:
        raise UserError(f"{flag} {text!r}: give at least one whole number, none below {least}")
    return values
