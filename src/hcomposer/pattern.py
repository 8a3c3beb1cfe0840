"""The pattern language: text in, a typed list of sublayers out.

One token per residual sublayer (``x = x + primitive(norm(x))``):

    A  global causal attention        W  sliding-window attention
    F  SwiGLU feed-forward            E  mixture-of-experts feed-forward
    S  Mamba-2 (SSD)                  D  Gated DeltaNet

``[A|S]`` is one intra-layer hybrid sublayer whose branches (sequence mixers only)
run in parallel; ``(AF)*16`` repeats; whitespace is ignored. The canonical form
is the expanded string, e.g. ``AFAF[A|S]F``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from hcomposer.errors import PatternError
from hcomposer.guards import cap
from hcomposer.primitive_specs import SPECS, FfnTokens, MixerTokens, TokenNames

__all__ = [
    "TOKENS",
    "MIXER_TOKENS",
    "FFN_TOKENS",
    "Sublayer",
    "parse_pattern",
    "format_pattern",
    "canonical",
    "to_megatron",
    "from_megatron",
    "count_tokens",
]

# Token -> human name, mixers and feed-forward tokens: live views of the one registry,
# hcomposer.primitive_specs (a primitive registered later is known here at once).
TOKENS: Mapping[str, str] = TokenNames()
# Sequence mixers may appear inside a parallel group; channel mixers may not.
MIXER_TOKENS = MixerTokens()
FFN_TOKENS = FfnTokens()

# A sublayer is a tuple of tokens: ("A",) for a plain sublayer, ("A", "S") for [A|S].
Sublayer = tuple[str, ...]


def _megatron() -> dict[str, str]:
    return {t: s.megatron for t, s in SPECS.items() if s.megatron}


def _megatron_known() -> str:
    return ", ".join(f"{m} ({SPECS[t].name})" for t, m in _megatron().items())


def _valid_list() -> str:
    return ", ".join(f"{t} ({n})" for t, n in TOKENS.items())


class _Parser:
    """Recursive-descent parser over the raw text, tracking 1-based positions."""

    def __init__(self, text: str):
        self.text = text
        self.i = 0
        # Checked as the list grows, before any repeat is expanded: (AF)*50000 ten times
        # is refused at the second repeat instead of building a million tuples.
        self.max_sublayers = cap("sublayers")

    def too_many(self, n: int, pos: int) -> PatternError:
        return self.error(
            f"pattern expands to {n:,} sublayers, above the cap of {self.max_sublayers:,} "
            "(set HCOMPOSER_MAX_SUBLAYERS to allow more)",
            pos,
        )

    def error(self, msg: str, pos: int | None = None) -> PatternError:
        pos = self.i if pos is None else pos
        shown = self.text if len(self.text) <= 80 else self.text[:77] + "..."
        here = self.text[pos] if pos < len(self.text) else None
        named = here is None or "found" in msg or repr(here) in msg
        found = "" if named else f" (found {here!r})"
        return PatternError(
            f"pattern {shown!r}: {msg} at position {pos + 1}{found}; "
            f"valid tokens: {_valid_list()}; "
            "groups [A|S], repeats (AF)*4",
            pattern=self.text,
            position=pos + 1,
        )

    def peek(self) -> str | None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1
        return self.text[self.i] if self.i < len(self.text) else None

    def parse(self) -> list[Sublayer]:
        out = self.sequence(closing=None)
        if self.peek() is not None:
            raise self.error(f"unexpected {self.text[self.i]!r}")
        if not out:
            raise PatternError(
                f"pattern {self.text!r} is empty; write at least one token, e.g. 'AF'; "
                f"valid tokens: {_valid_list()}",
                pattern=self.text,
                position=1,
            )
        return out

    def sequence(self, closing: str | None) -> list[Sublayer]:
        out: list[Sublayer] = []
        while True:
            c = self.peek()
            if c is None or c == closing:
                return out
            start = self.i
            if c in TOKENS:
                self.i += 1
                out.append((c,))
            elif c == "[":
                out.append(self.group())
            elif c == "(":
                out.extend(self.repeat())
            else:
                what = "unexpected" if c in ")]|*" else "unknown token"
                raise self.error(f"{what} {c!r}")
            if len(out) > self.max_sublayers:
                raise self.too_many(len(out), start)

    def group(self) -> Sublayer:
        start = self.i
        self.i += 1  # '['
        branches: list[str] = []
        while True:
            c = self.peek()
            if c is None:
                raise self.error("unclosed '['", start)
            if c not in TOKENS:
                raise self.error(f"unexpected {c!r} inside a group")
            if c not in MIXER_TOKENS:
                raise self.error(
                    f"{c!r} ({TOKENS[c]}) cannot be a parallel branch; groups hold sequence "
                    f"mixers {sorted(MIXER_TOKENS)}"
                )
            branches.append(c)
            self.i += 1
            c = self.peek()
            if c == "|":
                self.i += 1
                continue
            if c == "]":
                self.i += 1
                break
            if c is None:
                raise self.error("unclosed '['", start)
            raise self.error(f"expected '|' or ']' but found {c!r}")
        if len(branches) < 2:
            raise self.error("a group needs at least two branches, e.g. [A|S]", start)
        return tuple(branches)

    def repeat(self) -> list[Sublayer]:
        start = self.i
        self.i += 1  # '('
        body = self.sequence(closing=")")
        if self.peek() != ")":
            raise self.error("unclosed '('", start)
        if not body:
            raise self.error("empty repeat '()'", start)
        self.i += 1
        if self.peek() != "*":
            raise self.error("a '(...)' must be followed by '*k', e.g. (AF)*4")
        self.i += 1
        self.peek()
        j = self.i
        # ASCII digits only: str.isdigit() also accepts superscripts such as '²'.
        while j < len(self.text) and "0" <= self.text[j] <= "9" and j - self.i < 19:
            j += 1
        if j == self.i:
            raise self.error("expected a repeat count (digits 0-9) after '*'")
        count = int(self.text[self.i : j])
        if count < 1:
            raise self.error("repeat count must be at least 1")
        if count * len(body) > self.max_sublayers:
            raise self.too_many(count * len(body), start)
        self.i = j
        return body * count


def parse_pattern(text: str | Sequence[Sublayer]) -> list[Sublayer]:
    """Parse a pattern string into its list of sublayers; raise PatternError on bad input."""
    if not isinstance(text, str):
        layers = [tuple(s) for s in text]
        return parse_pattern(format_pattern(layers))
    limit = cap("pattern_chars")
    if len(text) > limit:
        raise PatternError(
            f"pattern of {len(text):,} characters is above the cap of {limit:,} "
            "(set HCOMPOSER_MAX_PATTERN_CHARS to allow more)",
            pattern=text[:80],
            position=limit + 1,
        )
    return _Parser(text).parse()


def format_pattern(layers: Iterable[Sublayer]) -> str:
    """The canonical expanded string of a list of sublayers."""
    return "".join(s[0] if len(s) == 1 else "[" + "|".join(s) + "]" for s in layers)


def canonical(text: str) -> str:
    """Parse and re-print: ``(AF)*2`` -> ``AFAF``."""
    return format_pattern(parse_pattern(text))


def count_tokens(layers: Iterable[Sublayer]) -> dict[str, int]:
    """Sublayers per primitive; a group counts once under its own key, e.g. ``[A|S]``."""
    counts: dict[str, int] = {}
    for s in layers:
        key = format_pattern([s])
        counts[key] = counts.get(key, 0) + 1
    return counts


def to_megatron(text: str | Sequence[Sublayer]) -> str:
    """Megatron-LM / Nemotron-H ``hybrid_override_pattern`` (M Mamba, * attention, - MLP, E MoE:
    each primitive's ``megatron`` letter in the registry)."""
    layers = parse_pattern(text)
    table = _megatron()
    out = []
    for pos, s in enumerate(layers, 1):
        if len(s) == 1 and s[0] not in table:
            # No symbol means no conversion, rather than a guessed one.
            raise PatternError(
                f"sublayer {pos} {s[0]!r} ({SPECS[s[0]].name}) has no symbol in the Nemotron-H "
                f"hybrid_override_pattern ({_megatron_known()}); a pattern with {s[0]} "
                "cannot be converted to Megatron",
                position=pos,
            )
        if len(s) > 1:
            raise PatternError(
                f"sublayer {pos} {format_pattern([s])!r} has no Megatron equivalent; "
                f"hybrid_override_pattern knows only single sublayers: {_megatron_known()}",
                position=pos,
            )
        out.append(table[s[0]])
    return "".join(out)


def from_megatron(text: str) -> list[Sublayer]:
    """Parse a Megatron ``hybrid_override_pattern`` such as ``M-M*-``."""
    back = {m: t for t, m in _megatron().items()}
    layers: list[Sublayer] = []
    for i, c in enumerate(text):
        if c.isspace():
            continue
        if c not in back:
            raise PatternError(
                f"hybrid_override_pattern {text!r}: unknown symbol {c!r} at position {i + 1}; "
                f"valid: {_megatron_known()}",
                pattern=text,
                position=i + 1,
            )
        layers.append((back[c],))
    if not layers:
        raise PatternError("hybrid_override_pattern is empty", pattern=text, position=1)
    return layers
