"""One typed way in for every JSON the package reads, and the config format versions.

- :func:`read_json_file` reads a file a user or an earlier run wrote: missing, unreadable,
  too large, not UTF-8, not JSON (``NaN`` included) or the wrong kind of value is a
  :class:`~hcomposer.errors.UserError` naming the file.
- :func:`check_fields` checks a dict against a frozen dataclass's fields: the type from the
  field's annotation (``bool`` is not an ``int``; floats are finite) and the range, choices
  and cap declared once on the field (:func:`hcomposer.fields.spec`). The message names the
  file and the field.
- :class:`Config` is the mixin of the config dataclasses: their constructor checks, ``to_dict``,
  ``from_dict`` and ``replace`` all come from those declarations.
- :func:`load_config` is both plus the class's own ``from_dict`` (whose own errors, of any
  kind, become one ``UserError`` naming the file).
- Format versions: every config file the package writes carries ``format_version``
  (:func:`stamp`); :func:`migrate` reads files without one as version 1 (the format before
  versions existed), upgrades older versions, and refuses newer ones.
- :func:`read_run_file` reads a file of a run or search folder; a damaged one is refused
  with what is damaged and how to recover.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from hcomposer.errors import ShapeError, UserError
from hcomposer.fields import field_specs, is_number
from hcomposer.guards import cap
from hcomposer.io import CONFIG_FORMAT_VERSION

__all__ = [
    "FORMAT_VERSION",
    "Config",
    "CONFIGS",
    "read_json_file",
    "parse_json_text",
    "check_fields",
    "load_config",
    "stamp",
    "migrate",
    "read_run_file",
    "DamagedFolder",
]

# The config format this package writes. Files without ``format_version`` are version 1.
FORMAT_VERSION = CONFIG_FORMAT_VERSION

# Migrations: MIGRATIONS[v] turns a version-v dict into a version-(v+1) dict.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


class DamagedFolder(UserError):
    """A run or search folder whose own files cannot be read back."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_text(text: str, where: str) -> Any:
    """``json.loads`` that refuses NaN/Infinity and turns every failure into a UserError."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise UserError(f"{where} is nested too deeply to be a config") from None
    except ValueError as e:
        raise UserError(f"{where} is not valid JSON: {_one_line(e)}") from None


def read_json_file(path: str | os.PathLike, what: str, *, expect: type | None = dict) -> Any:
    """The JSON value of a file; ``expect`` (dict, list or None for any) is its kind."""
    p = Path(path)
    where = f"{what} {os.fspath(path)!r}"
    try:
        if not p.is_file():
            raise UserError(f"{where} does not exist" + (" (a folder)" if p.is_dir() else ""))
        size = p.stat().st_size
        if size > cap("json_bytes"):
            raise UserError(
                f"{where} is {size:,} bytes, above the {cap('json_bytes'):,}-byte cap for a "
                "config; set HCOMPOSER_MAX_JSON_BYTES to allow more"
            )
        raw = p.read_bytes()
    except (OSError, ValueError) as e:
        raise UserError(f"{where} cannot be read: {_one_line(e)}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text") from None
    data = parse_json_text(text, where)
    _expect(data, expect, where)
    return data


def _expect(data: Any, expect: type | None, where: str) -> None:
    if expect is None or isinstance(data, expect):
        return
    kind = {dict: "a JSON object {...}", list: "a JSON list [...]"}.get(expect, expect.__name__)
    raise UserError(f"{where} must hold {kind}, not {_kind(data)}")


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {
        bool: "true/false",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(v), type(v).__name__)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] if text else type(e).__name__


def stamp(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``format_version`` first (every config file the package writes)."""
    return {
        "format_version": FORMAT_VERSION,
        **{k: v for k, v in data.items() if k != "format_version"},
    }


def migrate(data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data`` brought to :data:`FORMAT_VERSION`, without its ``format_version`` key.

    A file without the key is version 1 (written before versions existed); a newer
    version than this package knows is refused (upgrade hcomposer to read it).
    """
    if not isinstance(data, dict):
        raise UserError(f"{where} must hold a JSON object {{...}}, not {_kind(data)}")
    version = data.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{where}: format_version must be a whole number >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{where} has format_version {version}, newer than this hcomposer reads "
            f"(up to {FORMAT_VERSION}); upgrade hcomposer to read it"
        )
    out = {k: v for k, v in data.items() if k != "format_version"}
    while version < FORMAT_VERSION:
        out = MIGRATIONS[version](out)
        version += 1
    return out


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The annotations of ``cls``, each replaced by the field's ``accepts`` where declared."""
    if cls not in _HINTS:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # an annotation that cannot be resolved: no type checks for it
            hints = {}
        for name, rules in field_specs(cls).items():
            if rules.accepts is not None:
                hints[name] = rules.accepts
        _HINTS[cls] = hints
    return _HINTS[cls]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is int:
        return "a whole number"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type_name(a) for a in typing.get_args(tp)))
    if origin is tuple or origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "an object"
    return getattr(tp, "__name__", str(tp))


def _type_ok(tp: Any, v: Any, where: str, objects: bool = True) -> bool:
    """Whether ``v`` fits annotation ``tp``; nested dataclasses are checked (and raise) too.

    ``objects``: a dict may stand for a dataclass (JSON); in a constructor it may not.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if tp is float:
        ok = is_number(v)
        if ok and not isinstance(v, numbers.Integral) and not math.isfinite(v):
            raise UserError(f"{where} must be a finite number, got {v}")
        return ok
    if tp is str:
        return isinstance(v, str)
    if tp is type(None):
        return v is None
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(a, v, where, objects) for a in typing.get_args(tp))
    if origin is tuple or origin is list:
        if not isinstance(v, (list, tuple)):
            return False
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(v) != len(args):
                raise UserError(f"{where} must have {len(args)} elements, got {len(v)}")
            return all(
                _type_ok(a, x, f"{where}[{i}]", objects) for i, (a, x) in enumerate(zip(args, v))
            )
        elem = args[0] if args else Any
        return all(_type_ok(elem, x, f"{where}[{i}]", objects) for i, x in enumerate(v))
    if origin is dict:
        if not isinstance(v, dict):
            return False
        kt, vt = (typing.get_args(tp) or (Any, Any))[:2]
        return all(
            _type_ok(kt, k, f"{where} key {k!r}", objects)
            and _type_ok(vt, x, f"{where}[{k!r}]", objects)
            for k, x in v.items()
        )
    if dataclasses.is_dataclass(tp):
        if isinstance(v, tp):
            return True
        if isinstance(v, dict) and objects:
            check_fields(tp, v, where)
            return True
        return False
    if isinstance(tp, type):
        return isinstance(v, tp)
    return True


def check_fields(
    cls: type,
    data: dict[str, Any],
    where: str,
    *,
    error: type[UserError] = UserError,
    objects: bool = True,
) -> None:
    """Check the fields of ``data`` that ``cls`` declares: type, finiteness, range.

    Unknown keys are left to the class (its ``from_dict`` names the valid ones). ``error``
    is the class raised (a :class:`ShapeError` also gets the field's name).
    """
    try:
        _check_fields(cls, data, where, objects)
    except _FieldError as e:
        if issubclass(error, ShapeError):
            raise error(str(e), field=e.field) from None
        raise error(str(e)) from None


class _FieldError(UserError):
    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _check_fields(cls: type, data: dict[str, Any], where: str, objects: bool) -> None:
    if not isinstance(data, dict):
        raise _FieldError(f"{where} must be a JSON object {{...}}, not {_kind(data)}")
    hints = _hints(cls)
    rules = field_specs(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data or f.name not in hints:
            continue
        v = data[f.name]
        here = f"{where}: field {f.name!r}"
        try:
            fits = _type_ok(hints[f.name], v, here, objects)
        except _FieldError:
            raise
        except UserError as e:  # a nested check (a finite number, a tuple's length)
            raise _FieldError(str(e), f.name) from None
        if not fits:
            shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
            raise _FieldError(f"{here} must be {_type_name(hints[f.name])}, got {shown}", f.name)
        problem = rules[f.name].problem(v, f.name, where) if f.name in rules else None
        if problem:
            raise _FieldError(problem, f.name)


def load_config(cls: type, source: Any, where: str) -> Any:
    """An instance of ``cls`` from a dict, a JSON file path or JSON text, fully checked."""
    if isinstance(source, (str, os.PathLike)) and not str(source).lstrip().startswith("{"):
        data = read_json_file(source, where)
        where = f"{where} {os.fspath(source)!r}"
    elif isinstance(source, str):
        data = parse_json_text(source, where)
    else:
        data = source
    data = migrate(data, where)
    check_fields(cls, data, where)
    try:
        return cls.from_dict(data)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        raise UserError(f"{where}: {_one_line(e)}") from None


@functools.cache
def _annotations(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _json_value(v: Any) -> Any:
    """A field's value in its JSON form: tuples as lists, configs as their dicts."""
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return v.to_dict() if hasattr(v, "to_dict") else dataclasses.asdict(v)
    return v


def _from_json(tp: Any, v: Any) -> Any:
    """A JSON value turned into the form annotation ``tp`` holds (lists to tuples, objects to
    configs); a value of another form is left for the class to parse or refuse."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is not type(None) and _json_shaped(arg, v):
                return _from_json(arg, v)
        return v
    if origin is tuple and isinstance(v, list):
        args = typing.get_args(tp)
        if args and args[-1] is Ellipsis:
            return tuple(_from_json(args[0], x) for x in v)
        if len(args) == len(v):
            return tuple(_from_json(a, x) for a, x in zip(args, v))
        return tuple(v)
    if isinstance(tp, type) and issubclass(tp, Config) and isinstance(v, dict):
        return tp.from_dict(v)
    if dataclasses.is_dataclass(tp) and isinstance(v, dict):  # a dataclass of another kind
        hints = _annotations(tp)
        return tp(**{k: _from_json(hints.get(k, Any), x) for k, x in v.items()})
    return v


def _json_shaped(tp: Any, v: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return isinstance(v, (list, tuple))
    return dataclasses.is_dataclass(tp) and isinstance(v, dict)


# Every config class (a subclass of Config), in the order they were defined.
CONFIGS: list[type] = []
_C = typing.TypeVar("_C", bound="Config")


class Config:
    """The mixin of the frozen config dataclasses: checks, JSON and ``replace``, all read from
    the fields' declarations (:func:`hcomposer.fields.spec`).

    - The constructor (``dataclasses.replace`` and :meth:`replace` go through it) checks
      every field as given: its type (``accepts`` where declared), range, choices and cap,
      with the same messages as a JSON file. A subclass's own ``__post_init__`` calls
      ``super().__post_init__()`` first, then normalises and checks what spans fields.
    - :meth:`to_dict` is each field's JSON form in field order; :meth:`from_dict` migrates
      the format version, refuses unknown fields, checks every field and builds nested
      configs and tuples. :meth:`_upgrade` (a class's older layouts) and a :meth:`to_dict`
      override (a class whose file has another layout) are the only per-class code.
    """

    # How messages name the config ("train config: field 'lr' ...").
    _what: ClassVar[str] = "config"
    # The error raised (a ShapeError also names the field).
    _error: ClassVar[type[UserError]] = UserError

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        CONFIGS.append(cls)

    def __post_init__(self) -> None:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        check_fields(type(self), data, self._where(), error=self._error, objects=False)

    def _where(self) -> str:
        return self._what

    def replace(self: _C, **changes: Any) -> _C:
        """A copy with some fields changed (checked again)."""
        self._refuse_unknown(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` in this class's current layout (files of older layouts load as before)."""
        return data

    @classmethod
    def _refuse_unknown(cls, data: dict[str, Any]) -> None:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise cls._error(f"unknown {cls._what} field(s) {unknown}; valid: {sorted(names)}")

    @classmethod
    def from_args(cls: type[_C], args: Any, **given: Any) -> _C:
        """The config from a command's parsed options: each field whose name is an option's
        ``dest`` takes that option's value, unless ``given`` (values the command parsed
        itself, or fields no option sets) names it; fields named nowhere keep their
        defaults."""
        cls._refuse_unknown(given)
        names = [f.name for f in dataclasses.fields(cls)]
        taken = {n: getattr(args, n) for n in names if n not in given and hasattr(args, n)}
        return cls(**taken, **given)

    @classmethod
    def from_dict(cls: type[_C], data: dict[str, Any]) -> _C:
        data = cls._upgrade(migrate(data, cls._what))
        cls._refuse_unknown(data)
        check_fields(cls, data, cls._what, error=cls._error)
        fields = dataclasses.fields(cls)
        missing = [
            f.name
            for f in fields
            if f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            if issubclass(cls._error, ShapeError):
                raise cls._error(f"{cls._what} is missing field(s) {missing}", field=missing[0])
            raise cls._error(f"{cls._what} is missing field(s) {missing}")
        hints = _annotations(cls)
        return cls(**{k: _from_json(hints[k], v) for k, v in data.items()})


def read_run_file(
    folder: str | os.PathLike,
    name: str,
    *,
    kind: str = "run",
    expect: type | None = dict,
    keys: tuple[str, ...] = (),
    recover: str | None = None,
    versioned: bool = False,
) -> Any:
    """A file of a run (or search) folder, or a :class:`DamagedFolder` that says how to recover.

    ``keys`` must be present in the object. The default advice: restore the file from a
    copy, or start again in a new folder.
    """
    path = Path(folder) / name
    advice = recover or (f"restore {name} from a copy, or start the {kind} again with a new --out")
    try:
        data = read_json_file(path, f"{kind} file", expect=expect)
        if versioned:
            data = migrate(data, name)
        missing = [k for k in keys if k not in data]
        if missing:
            raise UserError(f"{name} has no {', '.join(map(repr, missing))}")
    except UserError as e:
        why = str(e).replace(f"{kind} file {str(path)!r}", name)
        raise DamagedFolder(
            f"{kind} folder {os.fspath(folder)!r} is damaged: {why}; {advice}"
        ) from None
    return data
