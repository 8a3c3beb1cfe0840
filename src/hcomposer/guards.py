"""Checks that run before any work: output paths, option values, and caps on the work asked for.

Every check raises :class:`~hcomposer.errors.UserError` (exit 2, one line) and writes nothing.
The caps keep a typo from hanging the machine; each names the environment variable that lifts
it for a user who really needs more (documented in docs/errors.md).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import psutil

from hcomposer.errors import UserError

__all__ = [
    "cap",
    "check_output_dir",
    "check_output_file",
    "check_device",
    "check_args",
    "cap_error",
    "check_cap",
    "memory_available",
    "check_memory",
    "MAX_SEED",
]

# Seeds go to numpy, which takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1

# name -> (default, environment variable that overrides it, what it bounds)
_CAPS: dict[str, tuple[int, str, str]] = {
    "sublayers": (10_000, "HCOMPOSER_MAX_SUBLAYERS", "sublayers in one pattern, all repeats"),
    "pattern_chars": (1_000_000, "HCOMPOSER_MAX_PATTERN_CHARS", "characters in a pattern"),
    "search_layers": (1_024, "HCOMPOSER_MAX_SEARCH_LAYERS", "searched positions"),
    "trials": (100_000, "HCOMPOSER_MAX_TRIALS", "trials of one search"),
    "tokens": (10**14, "HCOMPOSER_MAX_TOKENS", "tokens"),
    "count": (10**15, "HCOMPOSER_MAX_COUNT", "(any count)"),
    "steps": (10**9, "HCOMPOSER_MAX_STEPS", "training steps"),
    "json_bytes": (256 * 2**20, "HCOMPOSER_MAX_JSON_BYTES", "bytes of one JSON file"),
}

# Paths that are never an output folder (kernel and device file systems).
_SPECIAL_ROOTS = ("/proc", "/sys", "/dev")


def cap(name: str) -> int:
    """The current cap ``name`` (its environment variable wins over the default)."""
    default, env, _ = _CAPS[name]
    raw = os.environ.get(env)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{env}={raw!r} must be a whole number") from None
    if value < 1:
        raise UserError(f"{env}={raw!r} must be at least 1")
    return value


def cap_error(name: str, value: Any, flag: str) -> UserError:
    default, env, what = _CAPS[name]
    return UserError(
        f"{flag} {value} is above the cap of {cap(name):,} {what}; "
        f"set {env}=N to allow more if you really mean it"
    )


def check_cap(name: str, value: int, flag: str) -> int:
    if value > cap(name):
        raise cap_error(name, value, flag)
    return value


def _lexical(path: str | os.PathLike, flag: str) -> Path:
    text = os.fspath(path)
    if not text or not str(text).strip():
        raise UserError(f"{flag} is empty; give a path")
    if "\x00" in str(text):
        raise UserError(f"{flag} {text!r} contains a NUL character")
    try:
        os.fsencode(text)
    except UnicodeError:
        raise UserError(f"{flag} {text!r} cannot be encoded for this file system") from None
    p = Path(os.path.abspath(text))
    try:
        max_name = os.pathconf("/", "PC_NAME_MAX")
    except (OSError, ValueError):
        max_name = 255
    for part in p.parts:
        if len(os.fsencode(part)) > max_name:
            raise UserError(f"{flag} {text!r}: the name {part[:40]!r}... is too long")
    real = Path(os.path.realpath(p))
    for root in _SPECIAL_ROOTS:
        for q in (p, real):
            if q == Path(root) or Path(root) in q.parents:
                raise UserError(f"{flag} {text!r} is under {root}, which is not for files")
    return p


def _nearest_existing(p: Path) -> Path:
    q = p
    while not q.exists() and q != q.parent:
        q = q.parent
    return q


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A folder that exists (and is a writable folder) or can be created. Creates nothing."""
    p = _lexical(path, flag)
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{flag} {os.fspath(path)!r} is a file; choose a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {os.fspath(path)!r} is not writable")
        return p
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise UserError(f"{flag} {os.fspath(path)!r} cannot be created: {str(base)!r} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {os.fspath(path)!r} cannot be created: {str(base)!r} is read-only")
    return p


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """A file that can be written: its folder exists and is writable, it is not a folder."""
    p = _lexical(path, flag)
    if p.is_dir():
        raise UserError(f"{flag} {os.fspath(path)!r} is a folder; give a file name")
    if not p.parent.is_dir():
        raise UserError(f"{flag} {os.fspath(path)!r}: the folder {str(p.parent)!r} does not exist")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {os.fspath(path)!r}: the folder {str(p.parent)!r} is read-only")
    return p


def check_device(spec: str, flag: str = "--device") -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, present on this machine."""
    text = str(spec).strip()
    kind, _, index = text.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and kind != "cuda"):
        raise UserError(f"{flag} {spec!r}: choose auto, cpu, cuda, cuda:N or mps")
    if index and not (index.isascii() and index.isdigit()):
        raise UserError(f"{flag} {spec!r}: the device number must be a whole number")
    if kind in ("auto", "cpu"):
        return text
    import torch

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {spec!r}: this machine has no CUDA device; use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise UserError(f"{flag} {spec!r}: this machine has {n} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag} {spec!r}: MPS is not available here; use --device cpu")
    return text


# Checks of options that set no config field, by argparse destination: dest -> (lowest,
# highest, lowest allowed itself). An option that sets a config field is checked against that
# field's declaration instead (each command's ``option_fields``; see check_args). Only int/float
# values are checked here; string options are parsed (and checked) by their commands.
_INF = math.inf
_ARG_RANGES: dict[str, tuple[float, float, bool]] = {
    # eval: lm-eval documents per task; efficiency and compare --interleaved: longest context.
    "limit": (0, _INF, False),
    "max_len": (1, 2**24, True),
    # bench-search: replays per sampler, trials per replay.
    "seeds": (1, 100_000, True),
    "budget": (1, 100_000, True),
    # aggregate: k-means clusters.
    "k": (1, 1_024, True),
    # train: 0 asks for the automatic count, so the option is not the field (at least 1).
    "batch_threads": (0, 4_096, True),
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_args(args: Any, fields: dict[str, Any] | None = None) -> None:
    """Check every numeric option and the device of a parsed command line (before any work).

    ``fields`` maps an argparse destination to the declaration of the config field that
    option sets (a :class:`hcomposer.fields.FieldSpec`): the option is checked against it
    (range, choices, cap), so the command line and a JSON file refuse the same values.
    """
    fields = fields or {}
    for dest, rules in fields.items():
        value = getattr(args, dest, None)
        if value is None or isinstance(value, (bool, list, tuple)):
            continue
        if isinstance(value, str) and rules.choices is None:
            continue  # text the command parses itself (a count such as 2M, a path)
        problem = rules.problem(value, _flag(dest))
        if problem:
            raise UserError(problem)
    for dest, (lo, hi, closed) in _ARG_RANGES.items():
        value = getattr(args, dest, None)
        if dest in fields or value is None or isinstance(value, (str, bool, list, tuple)):
            continue
        flag = _flag(dest)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")
        if value < lo or (value == lo and not closed):
            bound = "at least" if closed else "above"
            raise UserError(f"{flag} must be {bound} {lo:g}, got {value:g}")
        if value > hi:
            raise UserError(f"{flag} must be at most {hi:g}, got {value:g}")
    for dest in ("out", "data", "storage", "config", "shape", "table", "tokenizer", "include_path"):
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():
            raise UserError(f"{_flag(dest)} is empty; give a value or leave the option out")
    device = getattr(args, "device", None)
    if isinstance(device, str):
        check_device(device)


def memory_available() -> int | None:
    """Bytes of memory this process could still use, or None if unknown: psutil's
    ``virtual_memory().available`` (Linux: ``MemAvailable`` of ``/proc/meminfo``; macOS: free
    plus inactive pages)."""
    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError, NotImplementedError, ValueError):
        return None


def check_memory(need: float, what: str) -> None:
    """Refuse work whose estimated memory ``need`` (bytes) exceeds what the machine has free.

    ``HCOMPOSER_SKIP_MEMORY_CHECK=1`` skips the check (the estimate is deliberately rough).
    """
    if os.environ.get("HCOMPOSER_SKIP_MEMORY_CHECK") == "1":
        return
    free = memory_available()
    if free is None or need <= free:
        return
    raise UserError(
        f"{what} needs about {need / 2**30:,.1f} GiB of memory and {free / 2**30:,.1f} GiB is "
        "free; ask for less, or set HCOMPOSER_SKIP_MEMORY_CHECK=1 to try anyway"
    )
