"""Figures and one PNG saver: matplotlib's object API, figures saved at 110 dpi, atomically.

Every plot is a plain :class:`matplotlib.figure.Figure` drawn by the Agg canvas, never a pyplot
figure: pyplot is not imported and ``matplotlib.use`` is never called, so a notebook user's
backend (inline, widget) stays as it was, and no figure is left open in pyplot's registry.

matplotlib is imported on the first plot, not at import time: every command that never plots
(``hcomposer inspect``, ``search --help``) would otherwise pay for it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from hcomposer.io import atomic_write_bytes

__all__ = ["subplots", "save_png"]

# Keywords of plt.subplots that belong to the figure rather than to its grid of axes.
_FIGURE_KEYWORDS = ("figsize", "dpi", "layout", "facecolor", "edgecolor")


def subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
    """A new figure and its axes, as ``matplotlib.pyplot.subplots`` would return them
    (``figsize`` and the other figure keywords go to the figure, the rest to
    :meth:`~matplotlib.figure.Figure.subplots`), without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**{k: kwargs.pop(k) for k in _FIGURE_KEYWORDS if k in kwargs})
    # The Agg canvas draws it (tight_layout and savefig need a renderer).
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_png(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (tight bounding box) atomically to ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
