"""A config field's rules, declared once on the field: help, range, choices, unit and cap.

Config dataclasses declare their fields with :func:`spec`::

    lr: float = spec(1e-3, gt=0, le=10.0, help="peak learning rate")

and everything else reads that declaration: the constructor's checks and ``to_dict`` /
``from_dict`` (:class:`hcomposer.config_io.Config`), the JSON checks
(:func:`hcomposer.config_io.check_fields`) and the command line
(:func:`hcomposer.guards.check_args`, through each command's ``option_fields``). A range
bound is ``ge``/``le`` (the bound itself allowed) or ``gt``/``lt`` (refused); upper bounds
keep a typo (three extra zeros) from asking for more than any machine has. A ``cap`` names
a cap of :mod:`hcomposer.guards` that a user may lift with its environment variable.

The declaration is plain ``dataclasses.field(metadata=...)``: no import cost, frozen
dataclasses stay frozen, and the messages stay one line in this package's words.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from hcomposer.guards import cap, cap_error

__all__ = ["FieldSpec", "spec", "field_specs", "field_spec", "is_number"]

_SPEC = "hcomposer.spec"


def is_number(v: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _g(v: float) -> str:
    """A number as written (1e-05, 20), in full where the short form would hide it."""
    if not isinstance(v, float):
        return f"{v}"
    return f"{v:g}" if float(f"{v:g}") == v else repr(v)


@dataclass(frozen=True)
class FieldSpec:
    """The rules of one config field (see the module docstring)."""

    help: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    unit: str = ""
    # The range and choices apply to every element of a list-valued field.
    each: bool = False
    # The forms a value may take on the way in (JSON and constructor), where the class
    # parses another form itself ("AFS" for a tuple of choices); None: the annotation.
    accepts: Any = None
    # A cap of hcomposer.guards (lifted by its environment variable), checked after the range.
    cap: str | None = None

    @property
    def has_range(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt))

    def range_text(self) -> str:
        """``above 0 and at most 10``, ``at least 1``, ... ('' without a range)."""
        parts = []
        if self.gt is not None:
            parts.append(f"above {_g(self.gt)}")
        elif self.ge is not None:
            parts.append(f"at least {_g(self.ge)}")
        if self.lt is not None:
            parts.append(f"below {_g(self.lt)}")
        elif self.le is not None and self.le != math.inf:
            parts.append(f"at most {_g(self.le)}")
        return " and ".join(parts)

    def in_range(self, v: float) -> bool:
        return not (
            (self.ge is not None and v < self.ge)
            or (self.gt is not None and v <= self.gt)
            or (self.le is not None and v > self.le)
            or (self.lt is not None and v >= self.lt)
        )

    def problem(self, value: Any, field: str, where: str = "") -> str | None:
        """What is wrong with ``value`` against the range, choices and cap (None: nothing).

        The message names the field as ``{where}: field '{field}'`` (a config) or as
        ``field`` alone (an option: ``--lr``). Types are checked elsewhere (a value of
        another type passes here).
        """
        name = f"{where}: field {field!r}" if where else field
        values = value if self.each and isinstance(value, (list, tuple)) else [value]
        every = ": every value" if self.each else ""
        for v in values:
            if self.choices is not None and isinstance(v, (str, int)) and v not in self.choices:
                valid = ", ".join(str(c) for c in self.choices)
                head = f"{where}: unknown {field}" if where else f"unknown {field}"
                return f"{head} {v!r}; valid: {valid}"
            if not is_number(v):
                continue
            try:
                finite = math.isfinite(v)
            except OverflowError:  # an integer too large for a float
                finite = True
            if not finite:
                return f"{name}{every} must be a finite number, got {v}"
            if not self.in_range(v):
                return f"{name}{every} must be {self.range_text()}, got {_g(v)}"
            if self.cap is not None and isinstance(v, int) and v > cap(self.cap):
                return str(cap_error(self.cap, v, name))
        return None


def spec(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    help: str = "",
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | list[Any] | None = None,
    unit: str = "",
    each: bool = False,
    accepts: Any = None,
    cap: str | None = None,
) -> Any:
    """A dataclass field carrying its :class:`FieldSpec` (no default: a required field)."""
    rules = FieldSpec(
        help=help, ge=ge, gt=gt, le=le, lt=lt,
        choices=None if choices is None else tuple(choices),
        unit=unit, each=each, accepts=accepts, cap=cap,
    )  # fmt: skip
    meta = {_SPEC: rules}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_specs(cls: type) -> dict[str, FieldSpec]:
    """Field name -> its declaration, for every declared field of a dataclass."""
    return {f.name: f.metadata[_SPEC] for f in dataclasses.fields(cls) if _SPEC in f.metadata}


def field_spec(cls: type, name: str) -> FieldSpec:
    """The declaration of one field (a field declared without one has no rules)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get(_SPEC, FieldSpec())
    raise KeyError(f"{cls.__name__} has no field {name!r}")
