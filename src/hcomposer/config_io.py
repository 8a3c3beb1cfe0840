"""One typed way in for every JSON the package reads, and the config format versions.

- :func:`read_json_file` reads a file a user or an earlier run wrote: missing, unreadable,
  too large, not UTF-8, not JSON (``NaN`` included) or the wrong kind of value is a
  :class:`~hcomposer.errors.UserError` naming the file.
- :func:`check_fields` checks a dict against a frozen dataclass's fields: the type from the
  field's annotation (``bool`` is not an ``int``; floats are finite) and the range declared
  once per field in :data:`RANGES`. The message names the file and the field.
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
import json
import math
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hcomposer.errors import ShapeError, UserError
from hcomposer.guards import cap
from hcomposer.io import CONFIG_FORMAT_VERSION

__all__ = [
    "FORMAT_VERSION",
    "RANGES",
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

_INF = math.inf
# Ranges, once per field: class name -> field -> (lowest, highest). Bounds are inclusive
# except where the tuple has a third element "open" (lowest itself refused).
# Upper bounds keep a typo (an extra three zeros) from asking for more than any machine has.
RANGES: dict[str, dict[str, tuple]] = {
    "Shape": {
        "d_model": (1, 2**17),
        "n_heads": (1, 2**12),
        "n_kv_heads": (1, 2**12),
        "head_dim": (0, 2**14),
        "ffn_dim": (1, 2**20),
        "vocab_size": (1, 2**23),
        "max_seq_len": (1, 2**24),
        "n_layers": (0, 2**16),
        "rope_theta": (0, 1e12, "open"),
        "norm_eps": (0, 1.0, "open"),
        "init_std": (0, 10.0, "open"),
        "window": (1, 2**24),
        "ssm_state": (1, 2**14),
        "ssm_expand": (1, 64),
        "ssm_head_dim": (1, 2**14),
        "ssm_conv": (1, 1024),
        "ssm_groups": (1, 2**12),
        "ssm_chunk": (1, 2**16),
        "n_experts": (1, 4096),
        "top_k": (1, 4096),
        "n_shared_experts": (0, 4096),
        "expert_ffn_dim": (0, 2**20),
        "moe_bias_rate": (0, 1.0),
    },
    "TrainConfig": {
        "tokens": (1, 10**14),
        "batch_size": (1, 2**20),
        "seq_len": (1, 2**24),
        "lr": (0, 10.0, "open"),
        "min_lr": (0, 10.0),
        "warmup": (0, 10**9),
        "decay_fraction": (0, 1.0),
        "weight_decay": (0, 100.0),
        "grad_clip": (0, _INF),
        "grad_accum": (1, 2**16),
        "eval_every": (0, 2**40),
        "eval_tokens": (1, 10**12),
        "log_every": (1, 2**40),
        "checkpoint_every": (0, 2**40),
        "seed": (0, 2**32 - 1),
        "val_fraction": (0, 0.5, "open"),
        "threads": (0, 4096),
        "batch_threads": (1, 4096),
    },
    "ProxyConfig": {
        "steps": (1, 10**7),
        "batch_size": (1, 2**16),
        "warmup_steps": (0, 10**7),
        "grad_clip": (0, _INF),
        "eval_batch_size": (1, 2**16),
        "threads": (0, 4096),
        "seed": (0, 2**32 - 1),
        "text_tokens": (1, 10**12),
        "text_seq_len": (1, 2**20),
        "text_batch_size": (1, 2**16),
        "text_lr": (0, 10.0, "open"),
        "text_eval_tokens": (1, 10**12),
        "patience": (0, 10**6),
        "restarts": (0, 100),
    },
    "SearchConfig": {
        "layers": (1, 2**20),
        "trials": (1, 2**40),
        "workers": (1, 4096),
        "seed": (0, 2**32 - 1),
        "stage_size": (1, 2**20),
        "n_startup": (1, 2**40),
        "population_size": (2, 2**20),
        "max_params": (0, 10**15),
        "max_kv_bytes": (0, 10**15),
    },
    "MADTaskConfig": {
        "vocab_size": (2, 2**20),
        "seq_len": (2, 2**20),
        "num_train_examples": (1, 10**7),
        "num_test_examples": (1, 10**7),
        "frac_noise": (0, 1.0),
        "noise_vocab_size": (0, 2**20),
        "k_motif_size": (1, 2**10),
        "v_motif_size": (1, 2**10),
        "num_tokens_to_copy": (1, 2**20),
    },
    "MQARConfig": {
        "vocab_size": (4, 2**20),
        "seq_len": (2, 2**20),
        "num_kv_pairs": (1, 2**20),
        "num_train_examples": (1, 10**7),
        "num_test_examples": (1, 10**7),
        "power_a": (0, 100.0, "open"),
    },
}
# Fields a class also accepts as text and parses itself ("AFS" choices, "A=1" counts,
# "score,kv"): the annotation checked here instead of the field's own.
TEXT_FIELDS: dict[str, dict[str, Any]] = {
    "SearchConfig": {
        "primitives": str | list[str] | tuple[str, ...],
        "objective": str | list[str] | tuple[str, ...],
        "min_count": dict[str, int] | list[str] | tuple[str, ...],
        "max_count": dict[str, int] | list[str] | tuple[str, ...],
        "proxy_config": dict[str, Any],
    },
}
# Per-element ranges of tuple fields.
ELEMENT_RANGES: dict[str, dict[str, tuple]] = {
    "TrainConfig": {"betas": (0, 1.0)},
    "ProxyConfig": {"lrs": (0, 10.0, "open"), "weight_decays": (0, 100.0)},
}


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


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: no type checks for it
        return {}


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
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple or origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "an object"
    return getattr(tp, "__name__", str(tp))


def _type_ok(tp: Any, v: Any, where: str) -> bool:
    """Whether ``v`` fits annotation ``tp``; nested dataclasses are checked (and raise) too."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if ok and not math.isfinite(v):
            raise UserError(f"{where} must be a finite number, got {v}")
        return ok
    if tp is str:
        return isinstance(v, str)
    if tp is type(None):
        return v is None
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(a, v, where) for a in typing.get_args(tp))
    if origin is tuple or origin is list:
        if not isinstance(v, (list, tuple)):
            return False
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(v) != len(args):
                raise UserError(f"{where} must have {len(args)} elements, got {len(v)}")
            return all(_type_ok(a, x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, v)))
        elem = args[0] if args else Any
        return all(_type_ok(elem, x, f"{where}[{i}]") for i, x in enumerate(v))
    if origin is dict:
        if not isinstance(v, dict):
            return False
        kt, vt = (typing.get_args(tp) or (Any, Any))[:2]
        return all(
            _type_ok(kt, k, f"{where} key {k!r}") and _type_ok(vt, x, f"{where}[{k!r}]")
            for k, x in v.items()
        )
    if dataclasses.is_dataclass(tp):
        if isinstance(v, tp):
            return True
        if isinstance(v, dict):
            check_fields(tp, v, where)
            return True
        # A shape may also be named by its preset, e.g. "shape": "tiny".
        return isinstance(v, str) and tp.__name__ == "Shape"
    return True


def _in_range(v: Any, rng: tuple) -> bool:
    lo, hi = rng[0], rng[1]
    if rng[2:] == ("open",) and v <= lo:
        return False
    return lo <= v <= hi


def _range_text(rng: tuple) -> str:
    lo, hi = rng[0], rng[1]
    low = f"above {lo:g}" if rng[2:] == ("open",) else f"at least {lo:g}"
    return low if hi == _INF else f"{low} and at most {hi:g}"


def check_fields(
    cls: type, data: dict[str, Any], where: str, *, error: type[UserError] = UserError
) -> None:
    """Check the fields of ``data`` that ``cls`` declares: type, finiteness, range.

    Unknown keys are left to the class (its ``from_dict`` names the valid ones). ``error``
    is the class raised (a :class:`ShapeError` also gets the field's name).
    """
    try:
        _check_fields(cls, data, where)
    except _FieldError as e:
        if issubclass(error, ShapeError):
            raise error(str(e), field=e.field) from None
        raise error(str(e)) from None


class _FieldError(UserError):
    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _check_fields(cls: type, data: dict[str, Any], where: str) -> None:
    if not isinstance(data, dict):
        raise _FieldError(f"{where} must be a JSON object {{...}}, not {_kind(data)}")
    hints = _hints(cls)
    ranges = RANGES.get(cls.__name__, {})
    element_ranges = ELEMENT_RANGES.get(cls.__name__, {})
    hints = {**hints, **TEXT_FIELDS.get(cls.__name__, {})}
    for f in dataclasses.fields(cls):
        if f.name not in data or f.name not in hints:
            continue
        v = data[f.name]
        here = f"{where}: field {f.name!r}"
        try:
            fits = _type_ok(hints[f.name], v, here)
        except _FieldError:
            raise
        except UserError as e:  # a nested check (a finite number, a tuple's length)
            raise _FieldError(str(e), f.name) from None
        if not fits:
            shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
            raise _FieldError(f"{here} must be {_type_name(hints[f.name])}, got {shown}", f.name)
        rng = ranges.get(f.name)
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if rng is not None and number and not _in_range(v, rng):
            raise _FieldError(f"{here} must be {_range_text(rng)}, got {v!r}", f.name)
        rng = element_ranges.get(f.name)
        if rng is not None and isinstance(v, (list, tuple)):
            for x in v:
                if isinstance(x, (int, float)) and not _in_range(x, rng):
                    raise _FieldError(
                        f"{here}: every value must be {_range_text(rng)}, got {x!r}", f.name
                    )


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
