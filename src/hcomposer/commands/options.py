"""Options several commands share, each written once: the forms a data source and a tokenizer
take, the output switches (``--json``, ``--no-progress``), and options that set a config field
as it is declared (:func:`add_fields`)."""

from __future__ import annotations

import argparse
import dataclasses

from hcomposer.errors import UserError
from hcomposer.fields import field_specs

__all__ = [
    "DATA_FORMS",
    "TOKENIZER_FORMS",
    "add_data",
    "add_tokenizer",
    "add_output",
    "add_fields",
    "int_list",
]

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


def add_fields(p: argparse.ArgumentParser, cls: type, names: str, counts: str = "") -> None:
    """One option per field of the config class ``cls`` named in ``names`` (space-separated;
    ``--seq-len`` for ``seq_len``), as the field declares it: its default, its type (that of
    the default; a bool field is a switch), its choices and its help. The fields named in
    ``counts`` take text such as 32K instead, which the command parses (``parse_count``).
    The values are checked against the same declaration by ``hcomposer.guards.check_args``
    (``option_fields``)."""
    declared = {f.name: f for f in dataclasses.fields(cls)}
    rules = field_specs(cls)
    for name in names.split() + counts.split():
        default, spec = declared[name].default, rules[name]
        if default is dataclasses.MISSING:
            raise ValueError(f"{cls.__name__}.{name} has no plain default to offer as an option")
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=spec.help)
            continue
        if name in counts.split():
            p.add_argument(flag, default=str(default), help=f"{spec.help} (default {default:,})")
            continue
        kind = type(default) if isinstance(default, (int, float)) else None
        choices = list(spec.choices) if spec.choices is not None else None
        p.add_argument(flag, type=kind, default=default, choices=choices, help=spec.help)


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
