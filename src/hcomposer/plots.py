"""One PNG saver: pyplot on the Agg backend, figures saved at 110 dpi, written atomically.

matplotlib is imported on the first plot, not at import time: importing pyplot costs about
0.4 s, which every command that never plots (``hcomposer inspect``, ``search --help``) would pay.
"""

from __future__ import annotations

import io
from pathlib import Path

from hcomposer.io import atomic_write_bytes

__all__ = ["pyplot", "save_png"]


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (tight bounding box) atomically to ``path``, then close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    pyplot().close(fig)
    return Path(path)
