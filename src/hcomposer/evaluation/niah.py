"""Needle in a haystack, as in the hybrid-architectures paper (arXiv 2510.04800).

A sentence "The special magic {city} number is: {7 digits}." is hidden at a
relative depth (0 = start, 1 = end) of a haystack of corpus text; the prompt
ends with the question and the answer's opening words, and the model continues
greedily. A trial is correct when the first 7-digit run in the continuation is
the needle's number (exact digits, nothing partial).

Lengths are prompt lengths in tokens; by default from a quarter of the training
length to twice it, where the paper saw attention-only models collapse and
hybrids keep retrieving to about 1.5x. The haystack comes from the embedded
corpus (``hcomposer.data.embedded_corpus_text``) unless a text is given; each
trial draws its own city, number and haystack offset from a seeded generator.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from hcomposer.config_io import Config
from hcomposer.data import embedded_corpus_text
from hcomposer.errors import UserError
from hcomposer.fields import spec
from hcomposer.guards import MAX_SEED
from hcomposer.plots import save_png, subplots

__all__ = ["NIAHConfig", "run_niah", "niah_lengths", "plot_niah", "niah_markdown", "CITIES"]

CITIES = (
    "Lisbon", "Nairobi", "Osaka", "Lima", "Oslo", "Hanoi", "Quito", "Dakar", "Perth", "Tunis",
    "Bergen", "Cusco", "Krakow", "Medan", "Sapporo", "Tbilisi", "Valencia", "Windhoek",
    "Yerevan", "Zagreb",
)  # fmt: skip
_DIGITS = re.compile(r"\d{7}")


@dataclass(frozen=True, kw_only=True)
class NIAHConfig(Config):
    """Lengths (tokens; None: factors of the training length), depths, trials per cell."""

    _what: ClassVar[str] = "niah"

    lengths: tuple[int, ...] | None = spec(
        None, ge=1, each=True, unit="tokens", help="prompt lengths (None: length_factors)"
    )
    length_factors: tuple[float, ...] = spec(
        (0.25, 0.5, 1.0, 1.5, 2.0), gt=0, le=1024, each=True, help="x the training length"
    )
    depths: tuple[float, ...] = spec(
        (0.0, 0.25, 0.5, 0.75, 1.0), ge=0, le=1.0, each=True, help="0: start, 1: end"
    )
    trials: int = spec(3, ge=1, le=10_000, help="trials per (length, depth)")
    seed: int = spec(0, ge=0, le=MAX_SEED)
    max_new_tokens: int = spec(12, ge=1, le=2**16, unit="tokens", help="greedy continuation")

    def resolve_lengths(self, train_len: int) -> list[int]:
        if self.lengths:
            return sorted({int(n) for n in self.lengths})
        return sorted({max(64, int(round(f * train_len))) for f in self.length_factors})


@dataclass
class _Trial:
    length: int
    depth: float
    city: str
    number: str
    answer: str = ""
    correct: bool = False
    extra: dict = field(default_factory=dict)


def _build_prompt(tokenizer, hay: np.ndarray, length: int, depth: float, city: str, number: str):
    """Token ids of haystack[:p] + needle + haystack[p:] + question, exactly ``length`` long."""
    needle = tokenizer.encode(f" The special magic {city} number is: {number}. ")
    question = tokenizer.encode(
        f"\nWhat is the special magic {city} number? The special magic {city} number is:"
    )
    n_hay = length - len(needle) - len(question)
    if n_hay < 1:
        raise UserError(f"niah length {length} is too short for the needle and the question")
    if n_hay > len(hay):
        raise UserError(f"niah haystack text has {len(hay)} tokens; length {length} needs {n_hay}")
    h = hay[:n_hay].tolist()
    p = int(round(depth * n_hay))
    # Move the needle forward to the next word boundary (at most 32 tokens) so that it
    # does not split a word; depth 0 and 1 stay at the ends.
    for k in range(p, min(p + 32, n_hay)):
        if k > 0 and tokenizer.decode(h[k - 1 : k]).endswith((" ", "\n", ".")):
            p = k
            break
    return h[:p] + needle + h[p:] + question


def niah_lengths(tokenizer, config: NIAHConfig, train_len: int) -> tuple[list[int], list[int]]:
    """(asked lengths, lengths that will run); UserError when none can run."""
    wanted = config.resolve_lengths(train_len)
    # The needle and the question alone take ~120 byte tokens: lengths that leave under
    # 32 tokens of haystack are skipped (and listed) rather than run meaningless.
    city = max(CITIES, key=len)
    needle = f" The special magic {city} number is: 1234567. "
    question = f"\nWhat is the special magic {city} number? The special magic {city} number is:"
    overhead = len(tokenizer.encode(needle)) + len(tokenizer.encode(question))
    lengths = [n for n in wanted if n >= overhead + 32]
    if not lengths:
        raise UserError(
            f"niah lengths {wanted} are all shorter than needle + question + 32 tokens "
            f"({overhead + 32}); pass longer ones with --niah-lengths"
        )
    return wanted, lengths


@torch.no_grad()
def _greedy(model, ids: list[int], max_new: int, eos: int | None) -> list[int]:
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    out = model.generate(x, max_new, eos_token_id=eos)[0, len(ids) :].tolist()
    return [t for t in out if t != eos]


def run_niah(
    model,
    tokenizer,
    *,
    train_len: int,
    haystack_text: str | None = None,
    config: NIAHConfig | None = None,
    progress=None,
) -> dict[str, Any]:
    """Accuracy per (length, depth); returns a JSON-ready dict with every trial."""
    config = config or NIAHConfig()
    if haystack_text is None:
        haystack_text = embedded_corpus_text()
    wanted, lengths = niah_lengths(tokenizer, config, train_len)
    corpus = np.asarray(tokenizer.encode(haystack_text), dtype=np.int64)
    longest = max(lengths)
    if len(corpus) < longest:
        reps = -(-longest // max(1, len(corpus))) + 1
        corpus = np.tile(corpus, reps)
    rng = np.random.default_rng(config.seed)
    eos = getattr(tokenizer, "eos_id", None)
    trials: list[_Trial] = []
    for length in lengths:
        for depth in config.depths:
            for _ in range(config.trials):
                city = CITIES[int(rng.integers(len(CITIES)))]
                number = str(int(rng.integers(1_000_000, 10_000_000)))
                start = int(rng.integers(0, max(1, len(corpus) - length)))
                ids = _build_prompt(tokenizer, corpus[start:], length, depth, city, number)
                new = _greedy(model, ids, config.max_new_tokens, eos)
                answer = tokenizer.decode(new)
                found = _DIGITS.search(answer)
                t = _Trial(
                    length, depth, city, number, answer, bool(found) and found.group() == number
                )
                trials.append(t)
                if progress is not None:
                    progress()
    table = {
        str(L): {
            f"{d:g}": float(np.mean([t.correct for t in trials if t.length == L and t.depth == d]))
            for d in config.depths
        }
        for L in lengths
    }
    by_length = {
        str(L): float(np.mean([t.correct for t in trials if t.length == L])) for L in lengths
    }
    return {
        "config": config.to_dict(),
        "train_len": train_len,
        "lengths": lengths,
        "skipped_lengths": [n for n in wanted if n not in lengths],
        "depths": list(config.depths),
        "accuracy": table,
        "accuracy_by_length": by_length,
        "accuracy_mean": float(np.mean([t.correct for t in trials])),
        "trials": [asdict(t) for t in trials],
    }


def niah_markdown(res: dict[str, Any]) -> str:
    """Accuracy table: rows are depths, columns prompt lengths (x training length)."""
    lengths, depths = res["lengths"], res["depths"]
    head = (
        "| depth \\ length | "
        + " | ".join(f"{L} ({L / res['train_len']:.2g}x)" for L in lengths)
        + " |"
    )
    rows = [head, "|" + "---|" * (len(lengths) + 1)]
    for d in depths:
        cells = [f"{res['accuracy'][str(L)][f'{d:g}']:.2f}" for L in lengths]
        rows.append(f"| {d:.0%} | " + " | ".join(cells) + " |")
    cells = [f"{res['accuracy_by_length'][str(L)]:.2f}" for L in lengths]
    rows.append("| **mean** | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_niah(res: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Heatmap PNG: depth (rows) x length (columns), colour = exact-digit accuracy."""
    lengths, depths = res["lengths"], res["depths"]
    grid = np.array([[res["accuracy"][str(L)][f"{d:g}"] for L in lengths] for d in depths])
    fig, ax = subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 2))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{L}\n{L / res['train_len']:.2g}x" for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt length (tokens, x training length)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.axvline(
        x=np.interp(res["train_len"], lengths, range(len(lengths))), color="k", ls="--", lw=1
    )
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title or "needle in a haystack")
    fig.tight_layout()
    save_png(fig, path)
