"""The scale ruler's text and pattern splits, fixed before any run.

Text: the embedded corpus cut into chapters, each assigned to train, validation or test by a
hash of its text, so the three never share a chapter and the same text always lands in the
same split. Patterns: a seeded random split into dev and held out, stratified by family
(A/F/W/E only, where rules about S and D are blind, or with S/D).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from hcomposer.data.sources import embedded_corpus_documents
from hcomposer.errors import UserError
from hcomposer.io import sha256_file

__all__ = ["SPLITS", "prepare_text", "family", "split_patterns"]

SPLITS = ("train", "val", "test")
_CHAPTER = re.compile(r"\n(?=chapter [0-9ivxlc]+\b)", re.IGNORECASE)


def _bucket(key: str, salt: str) -> float:
    h = hashlib.sha256(f"{salt}|{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def prepare_text(folder: str | Path, fractions: tuple[float, float] = (0.9, 0.05)) -> dict:
    """Write ``train/val/test.jsonl`` (one chapter a line) from the embedded corpus into
    ``folder`` and return ``{split: {"path", "sha256", "chapters", "bytes"}}``.

    A chapter goes to train when a hash of its text falls below ``fractions[0]``, to
    validation below ``sum(fractions)``, else to test: the same text always lands in the
    same split, and no chapter is in two.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    for doc in embedded_corpus_documents():
        for chapter in _CHAPTER.split(doc):
            if not chapter.strip():
                continue
            u = _bucket(chapter, "ruler-text")
            split = "train" if u < fractions[0] else "val" if u < sum(fractions) else "test"
            lines[split].append(json.dumps({"text": chapter}))
    info = {}
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        text = "\n".join(lines[split]) + "\n"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        info[split] = {
            "path": str(path),
            "sha256": sha256_file(path),
            "chapters": len(lines[split]),
            "bytes": len(text.encode()),
        }
    return info


def family(pattern: str) -> str:
    """``afwe`` for patterns made of A/F/W/E only (where has-S/D rules are blind), else ``sd``."""
    return "afwe" if set(re.sub(r"[\[\]|]", "", pattern)) <= set("AFWE") else "sd"


def split_patterns(
    patterns: list[str], *, heldout_afwe: int, heldout_sd: int, seed: int = 0
) -> dict[str, list[str]]:
    """A seeded random split into ``dev`` and ``heldout``, stratified by family."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {"dev": [], "heldout": []}
    for fam, k in (("afwe", heldout_afwe), ("sd", heldout_sd)):
        members = sorted(p for p in patterns if family(p) == fam)
        if k > len(members):
            raise UserError(f"only {len(members)} {fam} patterns; cannot hold out {k}")
        pick = set(rng.choice(len(members), size=k, replace=False).tolist())
        for i, p in enumerate(members):
            out["heldout" if i in pick else "dev"].append(p)
    return out
