"""Architecture = pattern + shape: the unit every stage of hcomposer passes around."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcomposer.config_io import migrate, parse_json_text, read_json_file, stamp
from hcomposer.errors import ShapeError, UserError
from hcomposer.pattern import Sublayer, count_tokens, format_pattern, parse_pattern
from hcomposer.primitive_specs import SPECS
from hcomposer.shapes import Shape, resolve_shape

__all__ = ["Architecture", "FORMAT"]

FORMAT = "hcomposer.architecture/1"
# Derived shape counts and the field a user sets to change them (for ShapeError.field).
_SETS = {"ssm_heads": "ssm_head_dim"}


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """A canonical pattern and a shape. Frozen; round-trips to JSON.

    ``pattern`` is always the canonical expanded string; ``layers`` is the typed
    list of sublayers it stands for (the truth the model is built from).
    """

    pattern: str
    shape: Shape

    def __post_init__(self) -> None:
        layers = parse_pattern(self.pattern)
        object.__setattr__(self, "pattern", format_pattern(layers))
        object.__setattr__(self, "_layers", tuple(layers))
        _check_groups(layers, self.shape)

    @classmethod
    def parse(cls, pattern: str, shape: str | Path | Shape | dict = "tiny") -> Architecture:
        """``Architecture.parse("(AF)*2[A|S]F", shape="tiny")``."""
        return cls(pattern=pattern, shape=resolve_shape(shape))

    @property
    def layers(self) -> tuple[Sublayer, ...]:
        return self._layers  # type: ignore[attr-defined]

    @property
    def n_sublayers(self) -> int:
        return len(self.layers)

    def counts(self) -> dict[str, int]:
        return count_tokens(self.layers)

    def with_shape(self, shape: str | Path | Shape | dict) -> Architecture:
        return Architecture(pattern=self.pattern, shape=resolve_shape(shape))

    def with_pattern(self, pattern: str) -> Architecture:
        return Architecture(pattern=pattern, shape=self.shape)

    def to_dict(self) -> dict[str, Any]:
        return stamp(
            {
                "format": FORMAT,
                "pattern": self.pattern,
                "layers": ["".join(s) if len(s) == 1 else list(s) for s in self.layers],
                "shape": self.shape.to_dict(),
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        data = migrate(data, "architecture JSON")
        if "pattern" not in data or "shape" not in data:
            raise UserError("architecture JSON needs the keys 'pattern' and 'shape'")
        fmt = data.get("format", FORMAT)
        if fmt != FORMAT:
            raise UserError(f"architecture format {fmt!r} is not known; expected {FORMAT!r}")
        if not isinstance(data["pattern"], str):
            raise UserError(
                f"architecture JSON: 'pattern' must be a string, not {data['pattern']!r}"
            )
        if not isinstance(data["shape"], (dict, str)):
            raise UserError(
                "architecture JSON: 'shape' must be an object of fields or a preset name"
            )
        arch = cls(pattern=data["pattern"], shape=resolve_shape(data["shape"]))
        if "layers" in data:
            layers = data["layers"]
            if not isinstance(layers, list) or not all(isinstance(s, (str, list)) for s in layers):
                raise UserError("architecture JSON: 'layers' must be a list of tokens")
            stored = [tuple(s) if isinstance(s, list) else (s,) for s in layers]
            if tuple(stored) != arch.layers:
                raise UserError("architecture JSON: 'layers' disagrees with 'pattern'")
        return arch

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Architecture:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            data = read_json_file(text, "architecture file")
            try:
                return cls.from_dict(data)
            except UserError as e:
                raise type(e)(f"architecture file {text!r}: {e}") from None
        return cls.from_dict(parse_json_text(text, "architecture JSON"))

    def __str__(self) -> str:
        return f"{self.pattern} @ {self.shape.name}"


def _check_groups(layers: list[Sublayer], shape: Shape) -> None:
    """Every branch of a group must get a whole number of heads: each primitive's
    ``split_fields`` divide by the number of branches (the registry says which)."""
    for pos, s in enumerate(layers, 1):
        k = len(s)
        if k == 1:
            continue
        where = f"sublayer {pos} {format_pattern([s])}"
        for tok in s:
            facts = SPECS[tok]
            for name in facts.split_fields:
                total = getattr(shape, name)
                multiple = facts.split_multiple_of
                if total % k == 0 and not (multiple and (total // k) % getattr(shape, multiple)):
                    continue
                extra = f" of {multiple}={getattr(shape, multiple)}" if multiple else ""
                # A derived count (ssm_heads) is reported against the field that sets it.
                field = name if name in Shape.__dataclass_fields__ else _SETS.get(name, name)
                raise ShapeError(
                    f"{where}: {name}={total} of shape {shape.name!r} cannot be split evenly "
                    f"into {k} branches{extra}",
                    field=field,
                )
