"""A study README states each figure followed by an HTML comment naming it (``1.172 <!-- s
-->``); tests check every such figure against the value recomputed from the raw file."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path


def assert_tagged_figures(readme: Path, figures: Mapping[str, str], strip: str = "`*(),;:") -> None:
    """Each ``figures`` name appears tagged in ``readme``, right after its value (the text
    before the tag, less the characters in ``strip``)."""
    text = readme.read_text()
    for name, value in figures.items():
        tag = f"<!-- {name} -->"
        assert tag in text, f"{readme.name} lacks the figure {name}"
        m = re.search(r"(\S+)\s*" + re.escape(tag), text)
        assert m and m.group(1).strip(strip) == value, (name, value, m and m.group(1))
