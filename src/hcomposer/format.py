"""Human-readable numbers and the shared rich console (stderr)."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from hcomposer.errors import UserError
from hcomposer.guards import check_cap

__all__ = [
    "human",
    "human_bytes",
    "parse_count",
    "console",
    "progress_bar",
    "bar_columns",
    "progress_gone_on_error",
    "markdown_table",
]

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def human(n: float, digits: int = 3) -> str:
    """1235814400 -> '1.24B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}g}{unit}"
    return f"{n:.{digits}g}"


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def parse_count(text: str, what: str = "count") -> int:
    """'1.2B', '350M', '1e9', '12000' -> int; a UserError names the bad value."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not m:
        raise UserError(f"{what} {text!r} is not a number; write e.g. 350M, 1.2B or 1e9")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value > 1e18:
        check_cap("count", 10**18, what)
    value = int(round(value))
    return check_cap("tokens" if "token" in what else "count", value, what)


def console():
    """A rich console on stderr, so stdout stays clean for --json."""
    from rich.console import Console

    return Console(stderr=True)


def bar_columns(field: str) -> tuple:
    """Description, bar, steps, the task's ``field`` text, elapsed time and ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(f"{{task.fields[{field}]}}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )


@functools.cache
def _gone_on_error_class():
    from rich.progress import Progress

    class ProgressGoneOnError(Progress):
        """A rich ``Progress`` that leaves no line behind when its block raises an error: the
        error's one line is then all the user sees (erased on a terminal; never printed to a
        file, where rich would otherwise print the bar's last state on exit). An interrupt
        (Ctrl-C) keeps it, to show how far the job got."""

        def __exit__(self, exc_type, exc, tb):
            if exc_type is None or not issubclass(exc_type, Exception):
                return super().__exit__(exc_type, exc, tb)
            # Progress.stop would also print an empty line where the console is not a terminal.
            self.live.transient = True
            self.live.stop()
            return None

    return ProgressGoneOnError


def progress_gone_on_error(*columns, **kwargs):
    """A rich ``Progress(*columns, **kwargs)`` that leaves no line behind when its block raises
    an error (rich is imported on first use: ``hcomposer --help`` stays light)."""
    return _gone_on_error_class()(*columns, **kwargs)


def progress_bar(enabled: bool = True, field: str = "info"):
    """The progress bar long jobs share (on stderr): description, bar, steps, the task's
    ``field`` text (loss, tokens/s), elapsed time and ETA. Disabled, it draws nothing; when
    its block raises an error, it leaves nothing behind (:func:`progress_gone_on_error`)."""
    return progress_gone_on_error(
        *bar_columns(field), console=console(), disable=not enabled, transient=False
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; floats printed with 4 significant digits."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
