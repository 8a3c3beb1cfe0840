"""The run-folder contract: every file a stage leaves, by name, with its reader and writer.

A training run (``RunDir``)::

    RUN/run.json            resolved config + version, git revision, command (written last
                            when a run starts: a folder with run.json has everything below)
    RUN/architecture.json   the trained architecture (vocabulary and length resolved)
    RUN/tokenizer/          the tokenizer's files
    RUN/metrics.jsonl       one record per logged or evaluated step
    RUN/checkpoint/         the latest checkpoint (see ``hcomposer.training.checkpoint``)
    RUN/status.json         {"status": "running" | "completed" | "diverged", "step", "message"}
    RUN/summary.json        the TrainResult, once the run stopped
    RUN/eval/results.json   the evaluation suite's results (+ results.md and plots)

A search (``SearchDir``): ``search.json`` (config), ``run.json``, ``study.db`` (the Optuna
study unless a storage URL was given), ``trials.jsonl`` and ``summary.json``. A pipeline
(``PipelineDir``): ``pipeline.json`` (stage state), ``search/``, ``train/<role>/`` (and
``train/<role>-seed<k>/``, the extra training seeds), ``rescore.json`` (the search's top
patterns on extra proxy seeds: ``{pattern: {seed: score}}``), ``compare/``, ``report.md`` and
the files of its stages. A conversion (``ConvertDir``, ``hcomposer convert``): ``convert.json``
(the request: teacher, target, keep-set or its size, strategy, objective), ``run.json``,
``placement/`` (``study.db`` and one training run per probe), ``placement.json`` (the kept
layers and per-layer scores), ``conversion.json`` (what each converted mixer got from its
attention layer), ``student/`` (the distillation run, a ``RunDir``) and ``report.md``. No other
module spells these names.
"""

from __future__ import annotations

import json
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

__all__ = ["RunDir", "SearchDir", "PipelineDir", "ConvertDir", "record_run", "RUN_JSON"]

RUN_JSON = "run.json"
SUMMARY_JSON = "summary.json"


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


class RunDir:
    """A training run's folder (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    run_json = property(lambda self: self.root / RUN_JSON)
    architecture = property(lambda self: self.root / "architecture.json")
    tokenizer = property(lambda self: self.root / "tokenizer")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    checkpoint = property(lambda self: self.root / "checkpoint")
    status_json = property(lambda self: self.root / "status.json")
    summary_json = property(lambda self: self.root / SUMMARY_JSON)
    eval_dir = property(lambda self: self.root / "eval")
    eval_results = property(lambda self: self.root / "eval" / "results.json")
    eval_markdown = property(lambda self: self.root / "eval" / "results.md")

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

    def record(self, config: dict, argv: list[str] | None = None) -> None:
        record_run(self.root, config, argv)

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

    def read_metrics(self) -> list[dict[str, Any]]:
        return list(read_jsonl(self.metrics))

    def truncate_metrics(self, step: int) -> None:
        """Keep only the records up to ``step``: the steps after it will be run again."""
        kept = [r for r in read_jsonl(self.metrics) if _step_of(r) <= step]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def eval_plot(self, name: str) -> Path:
        """A plot of the evaluation suite, e.g. ``eval_plot("niah")`` -> ``eval/niah.png``."""
        return self.eval_dir / f"{name}.png"


def _step_of(record: dict) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else 0


class SearchDir:
    """A search's folder (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "search.json")
    run_json = property(lambda self: self.root / RUN_JSON)
    study_db = property(lambda self: self.root / "study.db")
    trials = property(lambda self: self.root / "trials.jsonl")
    summary_json = property(lambda self: self.root / SUMMARY_JSON)

    def record(self, config: dict, argv: list[str] | None = None) -> None:
        record_run(self.root, config, argv)


class PipelineDir:
    """``hcomposer run``'s folder (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    state = property(lambda self: self.root / "pipeline.json")
    search = property(lambda self: SearchDir(self.root / "search"))
    aggregate = property(lambda self: self.root / "aggregate.json")
    compare = property(lambda self: self.root / "compare")
    report = property(lambda self: self.root / "report.md")
    rescore = property(lambda self: self.root / "rescore.json")

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

    def record(self, config: dict, argv: list[str] | None = None) -> None:
        record_run(self.root, config, argv)


class ConvertDir:
    """``hcomposer convert``'s folder (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    request = property(lambda self: self.root / "convert.json")
    run_json = property(lambda self: self.root / RUN_JSON)
    placement_dir = property(lambda self: self.root / "placement")
    study_db = property(lambda self: self.root / "placement" / "study.db")
    placement = property(lambda self: self.root / "placement.json")
    conversion = property(lambda self: self.root / "conversion.json")
    student = property(lambda self: RunDir(self.root / "student"))
    report = property(lambda self: self.root / "report.md")

    def probe(self, name: str) -> RunDir:
        """A short training run of the placement search, e.g. ``probe("layer-2")``."""
        return RunDir(self.root / "placement" / name)

    def read_request(self) -> dict[str, Any] | None:
        return _read_optional(self.request)

    def record(self, config: dict, argv: list[str] | None = None) -> None:
        record_run(self.root, config, argv)
