"""The run-folder contract: every file a stage leaves, by name, with its reader and writer.

A training run (``RunDir``)::

    RUN/run.json            resolved config + version, git revision, command (written last
                            when a run starts: a folder with run.json has everything below)
    RUN/architecture.json   the trained architecture (vocabulary and length resolved)
    RUN/tokenizer/          the tokenizer's files
    RUN/metrics.jsonl       one record per logged or evaluated step
    RUN/checkpoint/         the latest checkpoint (see ``hcomposer.training.checkpoint``)
    RUN/.checkpoint.old/    the one before it (used when the latest fails its checks)
    RUN/checkpoint.damaged/ a latest checkpoint that failed its checks, set aside on resume
    RUN/status.json         {"status": "running" | "completed" | "diverged", "step", "message"}
    RUN/summary.json        the TrainResult, once the run stopped
    RUN/eval/results.json   the evaluation suite's results (+ results.md and plots)
    RUN/tracking/           what ``--report-to`` writes (see ``hcomposer.tracking``): event
                            files, an offline W&B run, an MLflow file store, state.json

A search (``SearchDir``): ``search.json`` (config), ``run.json``, ``study.db`` (the Optuna
study unless a storage URL was given), ``trials.jsonl`` and ``summary.json``. A pipeline
(``PipelineDir``): ``pipeline.json`` (stage state), ``search/``, ``train/<role>/`` (and
``train/<role>-seed<k>/``, the extra training seeds), ``rescore.json`` (the search's top
patterns on extra proxy seeds: ``{pattern: {seed: score}}``), ``compare/``, ``report.md`` and
the files of its stages. A conversion (``ConvertDir``, ``hcomposer convert``): ``convert.json``
(the request: teacher, target, keep-set or its size, strategy, objective), ``run.json``,
``placement/`` (``study.db`` and one training run per probe), ``placement.json`` (the kept
layers and per-layer scores), ``conversion.json`` (what each converted mixer got from its
attention layer), ``student/`` (the distillation run, a ``RunDir``) and ``report.md``. Every
folder a command tracks (``--report-to``) holds its
``tracking/`` (:func:`tracking_dir`). No other module spells these names.

A process that trains into a run folder (``train``, ``run``) holds it (:class:`FolderLock`):
an ``flock`` on the folder itself, released by the kernel when the process ends however it
ends, and ``RUN/.holder.json`` (host, pid, command, start time) beside it, so that a second
process is refused with one line naming the holder.

A rehearsal (``--rehearse``) adds ``rehearsal.json`` to its folder (:func:`rehearsal_json`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from hcomposer.architecture import Architecture
from hcomposer.config_io import read_run_file
from hcomposer.errors import UserError
from hcomposer.io import (
    CONFIG_FORMAT_VERSION,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_jsonl,
    run_metadata,
)

__all__ = [
    "RunDir",
    "SearchDir",
    "PipelineDir",
    "ConvertDir",
    "RulerDir",
    "SweepDir",
    "BenchSearchDir",
    "FolderLock",
    "record_run",
    "rehearsal_json",
    "REHEARSAL_JSON",
    "tracking_dir",
    "RUN_JSON",
    "HOLDER",
]

RUN_JSON = "run.json"
# What a rehearsal (``--rehearse`` on run, proxy-rank, isoflop) ran: each stage, what it
# exercised, its wall time; beside the folder's other files.
REHEARSAL_JSON = "rehearsal.json"
SUMMARY_JSON = "summary.json"
# Who holds a run folder (see FolderLock); hidden, so a folder holding only it counts as empty.
HOLDER = ".holder.json"


def tracking_dir(folder: str | Path) -> Path:
    """The folder's experiment-tracking files (``hcomposer.tracking`` lays them out)."""
    return Path(folder) / "tracking"


def rehearsal_json(folder: str | Path) -> Path:
    """A rehearsal's record in ``folder`` (a pipeline, proxy-rank or isoflop folder)."""
    return Path(folder) / REHEARSAL_JSON


def record_run(folder: str | Path, config: dict, argv: list[str] | None = None) -> Path:
    """Write ``run.json`` (resolved config + metadata) into a folder, atomically."""
    path = Path(folder) / RUN_JSON
    doc = {"format_version": CONFIG_FORMAT_VERSION, "config": config, **run_metadata(argv)}
    atomic_write_json(path, doc)
    return path


def _read_optional(path: Path, versioned: bool = False) -> dict[str, Any] | None:
    """The file's object, None when absent; a damaged one is a DamagedFolder (a UserError)."""
    if not path.is_file():
        return None
    return read_run_file(path.parent, path.name, versioned=versioned)


def _at(*parts: str) -> property:
    """A folder's path ``root / parts...`` as a read-only attribute."""
    return property(lambda self: self.root.joinpath(*parts))


class _Folder:
    """What every folder class has: its root, its tracking folder and ``run.json``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    tracking = property(lambda self: tracking_dir(self.root))
    run_json = _at(RUN_JSON)

    def record(self, config: dict, argv: list[str] | None = None) -> None:
        record_run(self.root, config, argv)


class RunDir(_Folder):
    """A training run's folder (see the module docstring)."""

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    architecture = _at("architecture.json")
    tokenizer = _at("tokenizer")
    metrics = _at("metrics.jsonl")
    checkpoint = _at("checkpoint")
    # The checkpoint before the latest (kept: a damaged latest one falls back to it).
    previous_checkpoint = _at(".checkpoint.old")
    # A latest checkpoint that failed its checks, moved aside when training resumed without it.
    damaged_checkpoint = _at("checkpoint.damaged")
    status_json = _at("status.json")
    summary_json = _at(SUMMARY_JSON)
    eval_dir = _at("eval")
    eval_results = _at("eval", "results.json")
    eval_markdown = _at("eval", "results.md")

    def is_run(self) -> bool:
        """True when the folder holds a run's architecture (what every reader needs)."""
        return self.architecture.is_file()

    def require_run(self) -> None:
        if not self.is_run():
            raise UserError(
                f"{str(self.root)!r} is not an hcomposer run folder (no {self.architecture.name})"
            )

    def read_architecture(self) -> Architecture:
        return Architecture.from_json(self.architecture)

    def write_architecture(self, arch: Architecture) -> None:
        atomic_write_json(self.architecture, arch.to_dict())

    def read_run(self) -> dict[str, Any]:
        """``run.json`` (``{}`` when absent)."""
        return _read_optional(self.run_json, versioned=True) or {}

    def read_summary(self) -> dict[str, Any] | None:
        return _read_optional(self.summary_json)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_json, summary)

    def read_status(self) -> dict[str, Any]:
        try:
            status = read_json(self.status_json)
        except (OSError, ValueError):
            return {}
        # status.json is informative only: a damaged one reads as "unknown".
        return status if isinstance(status, dict) else {}

    def write_status(self, status: str, step: int, message: str = "") -> None:
        atomic_write_json(self.status_json, {"status": status, "step": step, "message": message})

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics, record)

    def read_metrics(self, *, tell: bool = True) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl``; lines that are not JSON records (torn by a kill,
        edited) are skipped, and with ``tell`` one line on stderr says how many and where."""
        skipped: list[int] = []
        records = list(read_jsonl(self.metrics, skipped))
        if skipped and tell:
            print(f"hcomposer: warning: {_skipped_lines(self.metrics, skipped)}", file=sys.stderr)
        return records

    def truncate_metrics(self, step: int) -> None:
        """Keep only the records up to ``step``: the steps after it will be run again.
        Lines that are not JSON records are dropped, and one line on stderr says so."""
        skipped: list[int] = []
        kept = [r for r in read_jsonl(self.metrics, skipped) if _step_of(r) <= step]
        if skipped:
            print(
                f"hcomposer: warning: {_skipped_lines(self.metrics, skipped)}; the file is "
                "rewritten without them",
                file=sys.stderr,
            )
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def eval_plot(self, name: str) -> Path:
        """A plot of the evaluation suite, e.g. ``eval_plot("niah")`` -> ``eval/niah.png``."""
        return self.eval_dir / f"{name}.png"


def _skipped_lines(path: Path, lines: list[int]) -> str:
    where = ", ".join(str(n) for n in lines[:10]) + (", ..." if len(lines) > 10 else "")
    n = len(lines)
    return (
        f"skipped {n} line{'s' if n > 1 else ''} of {str(path)!r} that {'are' if n > 1 else 'is'} "
        f"not a JSON record (line{'s' if n > 1 else ''} {where}; torn by a kill, or edited)"
    )


def _step_of(record: dict) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else 0


class SearchDir(_Folder):
    """A search's folder (see the module docstring)."""

    config = _at("search.json")
    study_db = _at("study.db")
    trials = _at("trials.jsonl")
    summary_json = _at(SUMMARY_JSON)


class PipelineDir(_Folder):
    """``hcomposer run``'s folder (see the module docstring)."""

    state = _at("pipeline.json")
    search = property(lambda self: SearchDir(self.root / "search"))
    aggregate = _at("aggregate.json")
    compare = _at("compare")
    report = _at("report.md")
    rescore = _at("rescore.json")

    def architecture(self, role: str) -> Path:
        """The architecture chosen for ``role`` ("composite" or "baseline")."""
        return self.root / f"{role}.json"

    def train(self, role: str, seed_index: int = 0) -> RunDir:
        """``role``'s training run; the extra seeds' runs (index >= 1) beside it."""
        return RunDir(self.root / "train" / (f"{role}-seed{seed_index}" if seed_index else role))

    def read_rescore(self) -> dict[str, dict[str, float]]:
        """``rescore.json`` (``{}`` when absent): proxy score by pattern, then by seed."""
        return _read_optional(self.rescore) or {}

    def write_rescore(self, scores: dict[str, dict[str, float]]) -> None:
        atomic_write_json(self.rescore, scores)

    def plot(self, name: str) -> Path:
        return self.root / f"{name}.png"


class ConvertDir(_Folder):
    """``hcomposer convert``'s folder (see the module docstring)."""

    request = _at("convert.json")
    placement_dir = _at("placement")
    study_db = _at("placement", "study.db")
    placement = _at("placement.json")
    conversion = _at("conversion.json")
    student = property(lambda self: RunDir(self.root / "student"))
    report = _at("report.md")

    def probe(self, name: str) -> RunDir:
        """A short training run of the placement search, e.g. ``probe("layer-2")``."""
        return RunDir(self.root / "placement" / name)

    def read_request(self) -> dict[str, Any] | None:
        return _read_optional(self.request)


class RulerDir(_Folder):
    """A ruler study's folder (``benchmarks/results/ruler_v3``): the split and plan fixed
    before any run, the resolved config, every run and proxy score as JSON lines, and the
    summaries made from them."""

    split = _at("split.json")
    plan = _at("plan.json")
    config = _at("ruler.json")
    runs = _at("runs.jsonl")
    proxy_scores = _at("proxy_scores.jsonl")
    result_json = _at("result.json")
    result_md = _at("result.md")
    zoo_json = _at("zoo.json")
    zoo_md = _at("zoo.md")
    zoo_png = _at("zoo.png")


class SweepDir(_Folder):
    """An IsoFLOP sweep's folder (``hcomposer isoflop``): its config, the fitted results and
    their two plots (the training runs of its points sit in folders beside them)."""

    config = _at("sweep.json")
    results = _at("results.json")
    isoflop_png = _at("isoflop.png")
    frontier_png = _at("frontier.png")


class BenchSearchDir(_Folder):
    """``hcomposer bench-search``'s folder: results, report, regret plot, replay log."""

    results = _at("results.json")
    report = _at("report.md")
    regret_png = _at("regret.png")
    replays = _at("replays.jsonl")


class FolderLock:
    """Hold a run folder for this process: ``with FolderLock(out, argv=argv): ...``.

    The lock is an ``flock`` on the folder itself (nothing to clean up: the kernel drops it
    when the process ends, killed or not). While it is held, ``.holder.json`` in the folder
    names the holder (host, pid, command, start time) for the message another process gets:
    a UserError, raised before that process writes anything. A folder that does not exist yet
    is created to be locked; when the block raises, the folders created here are removed again
    if they are still empty (bad input leaves nothing behind). A folder that cannot be opened
    (not a folder, no permission) is left to the caller's own checks, unlocked.
    ``enabled=False`` (the other ranks of a distributed run) does nothing.
    """

    def __init__(self, root: str | Path, *, argv: list[str] | None = None, enabled: bool = True):
        self.root = Path(root)
        self.argv = argv
        self.enabled = enabled
        self._fd: int | None = None
        self._created: Path | None = None

    def __enter__(self) -> FolderLock:
        if not self.enabled:
            return self
        self._created = _create_missing(self.root)
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(_in_use(self.root)) from None
        self._fd = fd
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": self.argv if self.argv is not None else sys.argv,
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        # Best effort: the lock itself is what keeps a second process out.
        with contextlib.suppress(OSError):
            atomic_write_json(self.root / HOLDER, holder)
        return self

    def __exit__(self, exc_type, *exc: Any) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            (self.root / HOLDER).unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if exc_type is not None and self._created is not None:
            _remove_empty(self.root, self._created)


def _create_missing(root: Path) -> Path | None:
    """Create ``root`` (and its missing parents); the topmost folder created, or None."""
    top, p = None, root
    while not p.exists() and p.parent != p:
        top, p = p, p.parent
    if top is None:
        return None
    try:
        root.mkdir(parents=True)
    except OSError:
        return None
    return top


def _remove_empty(root: Path, top: Path) -> None:
    """Remove ``root`` and its parents up to ``top`` while they are empty."""
    p = root
    while True:
        try:
            p.rmdir()
        except OSError:
            return
        if p == top:
            return
        p = p.parent


def _in_use(root: Path) -> str:
    try:
        holder = read_json(root / HOLDER)
        who = (
            f"pid {int(holder['pid'])} on {holder['host']}, since {holder['since']}: "
            f"{' '.join(str(a) for a in holder['command'])[:160]}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        who = "it has not recorded its pid yet"
    return (
        f"run folder {str(root)!r} is in use by another hcomposer process ({who}); wait for "
        "it to end or stop it, then run this again, or choose another --out"
    )
