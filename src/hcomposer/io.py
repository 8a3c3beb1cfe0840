"""Files: atomic writes, JSON state, run-folder records. Shared by every stage."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from hcomposer.version import __version__

# The config format version of the files hcomposer writes (see hcomposer.config_io).
CONFIG_FORMAT_VERSION = 1

__all__ = [
    "CONFIG_FORMAT_VERSION",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "read_json",
    "append_jsonl",
    "read_jsonl",
    "sha256_file",
    "entry_lock",
    "current_umask",
    "git_revision",
    "run_metadata",
    "pick",
]


def pick(obj: Any, *names: str) -> dict[str, Any]:
    """``{name: obj.name}`` for each of ``names``, in that order: a record's ``to_dict`` when
    its JSON keys are its attribute names."""
    return {name: getattr(obj, name) for name in names}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the permissions of any file this user creates.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def entry_lock(entry: str | Path) -> Iterator[None]:
    """Hold the lock of the cache entry ``entry`` (the file ``.NAME.lock`` beside it).

    Parallel processes asking for one entry take it, look for the finished entry again, and
    build only if it is still missing: the entry is built once. The lock is the operating
    system's (``flock``), released when its holder dies, so a killed build never blocks the
    next. A process that has to wait says so once on stderr.

    The empty lock file stays beside a finished entry. Where there is no entry on release (the
    build failed, or the entry was removed under the lock) it is removed too, so that a refused
    build leaves nothing behind; a process still waiting on the removed file then finds no
    entry and builds, at worst beside a newcomer that locked a new file (duplicate work, as
    without the lock; recent filelock versions re-open the file instead).
    """
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    path = entry.with_name(f".{entry.name}.lock")
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"hcomposer: waiting for another process building {entry}", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        if not entry.exists():
            # Windows cannot remove a file held open (its filelock removes it on release).
            with suppress(OSError):
                path.unlink()
        lock.release()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line and flush it to disk (a killed run keeps every whole line).

    A line torn by a kill (no newline at the end of the file) is closed first, so the new
    record starts a line of its own instead of being glued to the fragment and lost with it.
    """
    line = (json.dumps(record, default=_json_default) + "\n").encode("utf-8")
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path, skipped: list[int] | None = None) -> Iterator[dict]:
    """Every whole line; a torn last line (killed mid-write) is skipped.

    ``skipped`` (a list) receives the 1-based number of each line skipped, so that a caller
    can say how many were skipped and where (blank lines are not counted).
    """
    p = Path(path)
    if not p.exists():
        return
    with open(p, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                record = None
                if not line.strip():
                    continue
            # Only objects are records; anything else is a damaged line, skipped like a torn one.
            if isinstance(record, dict):
                yield record
            elif skipped is not None:
                skipped.append(number)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_revision() -> str | None:
    """The git revision of the hcomposer checkout, if it is one."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_metadata(argv: list[str] | None = None) -> dict[str, Any]:
    """Version, git revision, command line, host and library versions."""
    meta: dict[str, Any] = {
        "hcomposer_version": __version__,
        "git_revision": git_revision(),
        "command": argv if argv is not None else sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["cuda"] = torch.cuda.is_available()
    except ImportError:
        pass
    return meta
