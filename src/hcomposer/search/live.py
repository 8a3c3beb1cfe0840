"""The live view of a running search, on stderr: trials done / total, best so far, ETA.

On a terminal it is a rich progress bar; otherwise (a log file, a test) one line per
newly finished trial, so a long search leaves a readable record. An error leaves no progress
line before its own (the bar is erased; nothing is printed before the first trial ends).
"""

from __future__ import annotations

import time
from typing import Any

from rich.progress import Progress

from hcomposer.format import bar_columns, console, progress_gone_on_error

__all__ = ["LiveView"]


class LiveView:
    """``update(done, best_pattern, best_score, note)``; a context manager."""

    def __init__(self, total: int, *, enabled: bool = True, label: str = "search"):
        self.total = total
        self.enabled = enabled
        self.label = label
        self.console = console()
        self.interactive = enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._task: Any = None
        self._last_done: int | None = None
        self._t0 = time.perf_counter()
        self._done0: int | None = None

    def __enter__(self) -> LiveView:
        if self.interactive:
            self._progress = progress_gone_on_error(
                *bar_columns("best"), console=self.console, transient=False
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total, best="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def _eta(self, done: int) -> str:
        if self._done0 is None or done <= self._done0:
            return "?"
        rate = (time.perf_counter() - self._t0) / (done - self._done0)
        secs = max(0.0, rate * (self.total - done))
        return f"{secs / 60:.1f} min" if secs >= 90 else f"{secs:.0f} s"

    def update(
        self, done: int, best_pattern: str | None, best_score: float | None, note: str = ""
    ) -> None:
        if not self.enabled:
            return
        if self._done0 is None:
            self._done0 = done
            self._t0 = time.perf_counter()
        best = f"best {best_pattern} {best_score:.4f}" if best_pattern is not None else "best -"
        if note:
            best = f"{best} · {note}"
        if self._progress is not None:
            self._progress.update(self._task, completed=done, best=best)
        elif self._last_done is not None and done != self._last_done:
            # Not before a trial ended: a search that stops on an error prints that line only.
            self.console.print(
                f"{self.label}: {done}/{self.total} trials · {best} · ETA {self._eta(done)}",
                highlight=False,
                soft_wrap=True,
            )
        self._last_done = done

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)
