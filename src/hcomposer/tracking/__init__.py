"""Experiment tracking: one interface (:class:`Tracker`) over TensorBoard, W&B, MLflow, Trackio.

``--report-to`` (on ``train``, ``search``, ``run``, ``proxy-rank`` and ``isoflop``) takes the
names and values of transformers' ``TrainingArguments.report_to``: a comma-separated subset of
``tensorboard,wandb,mlflow,trackio``, ``all`` (every one installed) or ``none``. Left out, it
is TensorBoard when that is installed, else nothing. Each backend is an optional extra
(``pip install 'hcomposer[wandb]'``); naming one that is not installed is a one-line error
(exit 2) before anything runs.

Where each writes (``FOLDER`` is the run, search or sweep folder, ``TRACK`` its
``runs.tracking_dir``):

- tensorboard: event files in ``TRACK/tensorboard`` (``tensorboard --logdir runs/``);
- wandb: ``TRACK/wandb``, offline unless the user is logged in or ``WANDB_MODE`` says
  otherwise (``wandb sync TRACK/wandb/offline-run-*`` uploads an offline run later);
- mlflow: ``MLFLOW_TRACKING_URI`` when set (one store for many runs, side by side), else a
  local file store in ``TRACK/mlruns``; experiment ``MLFLOW_EXPERIMENT_NAME`` or hcomposer;
- trackio: trackio's own local store (``TRACKIO_DIR``; ``trackio show``), project hcomposer.

A resumed run continues the same tracked run (the ids are kept in ``TRACK/state.json``) and
does not log a step twice: TensorBoard hides the events a killed process wrote after the
checkpoint (``purge_step``) and the re-run steps take their place; W&B, MLflow and Trackio
are asked for the last step they hold and only later steps are sent (an offline W&B run
knows none: W&B itself drops steps below the run's current one when the folders are synced).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hcomposer.errors import UserError
from hcomposer.io import atomic_write_json, read_json
from hcomposer.tracking.backends import TRACKERS, Tracker, flatten, import_backend, installed

__all__ = [
    "BACKENDS",
    "STEP_KEYS",
    "Tracker",
    "Tracking",
    "parse_report_to",
    "add_report_to",
    "open_tracking",
    "flatten",
]

BACKENDS = ("tensorboard", "wandb", "mlflow", "trackio")
# metrics.jsonl's keys -> the trackers' metric names (grouped by prefix in every dashboard).
STEP_KEYS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "mfu": "train/mfu",
    "peak_mem_mib": "train/peak_mem_mib",
    "tokens": "train/tokens",
    "val_loss": "val/loss",
}


def parse_report_to(text: str | None) -> tuple[str, ...]:
    """The backends ``--report-to TEXT`` names (None: TensorBoard when installed).

    Every named backend is imported here, so a missing package fails before any work.
    """
    if text is None:
        return ("tensorboard",) if installed("tensorboard") else ()
    items = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    choices = "give a comma-separated subset of tensorboard,wandb,mlflow,trackio, all or none"
    if not items:
        raise UserError(f"--report-to is empty; {choices}")
    if {"all", "none"} & set(items):
        if len(items) > 1:
            raise UserError(f"--report-to {text!r}: all and none stand alone; {choices}")
        return () if items[0] == "none" else tuple(n for n in BACKENDS if installed(n))
    for t in items:
        if t not in BACKENDS:
            raise UserError(f"--report-to: unknown tracker {t!r}; {choices}")
    names = tuple(dict.fromkeys(items))
    for name in names:
        import_backend(name)
    return names


def add_report_to(parser) -> None:
    """The ``--report-to`` option, the same on every command that has it."""
    parser.add_argument(
        "--report-to",
        default=None,
        metavar="LIST",
        help="experiment trackers: tensorboard,wandb,mlflow,trackio (any subset), all "
        "(those installed) or none; default: tensorboard when installed",
    )


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries as floats (None and text left out; NaN kept: it is the news)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class Tracking:
    """The trackers of one run, behind the same calls (none: every call does nothing)."""

    def __init__(self, trackers: Iterable[Tracker] = (), state: dict | None = None,
                 state_path: Path | None = None):  # fmt: skip
        self.trackers = list(trackers)
        # Kept in TRACK/state.json: each backend's ids, and what a caller records (save()).
        self.state = state if state is not None else {}
        self.state_path = state_path
        self._callbacks: dict[str, Any] = {}

    def save(self) -> None:
        if self.state_path is not None:
            atomic_write_json(self.state_path, self.state)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_params(self, params: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the numeric entries at ``step``; a step a tracker already holds is skipped."""
        values = _numbers(metrics)
        if not values:
            return
        for t in self.trackers:
            if t.last_step is None or step > t.last_step:
                t.log_metrics(values, step)

    def log_record(self, record: Mapping[str, Any]) -> None:
        """A metrics.jsonl record, under :data:`STEP_KEYS`' names, at its step."""
        self.log_metrics({STEP_KEYS[k]: v for k, v in record.items() if k in STEP_KEYS},
                         int(record["step"]))  # fmt: skip

    def log_text(self, texts: Mapping[str, str], step: int) -> None:
        for t in self.trackers:
            if t.last_step is None or step > t.last_step:
                t.log_text(texts, step)

    def log_trial(self, study, trial, step: int, metrics: Mapping[str, Any],
                  texts: Mapping[str, str], metric_names: list[str]) -> None:  # fmt: skip
        """One search trial at ``step``: through the backend's optuna-integration callback
        where it has one (given ``trial`` renumbered to ``step``), else as metrics and text."""
        values = _numbers(metrics)
        for t in self.trackers:
            if t.last_step is not None and step <= t.last_step:
                continue
            if t.name not in self._callbacks:
                self._callbacks[t.name] = t.trial_callback(metric_names)
            callback = self._callbacks[t.name]
            if callback is not None:
                t.log_trial(callback, study, trial, texts)
            else:
                t.log_row(values, texts, step)

    def log_images(self, images: Mapping[str, Path], step: int) -> None:
        present = {k: Path(p) for k, p in images.items() if Path(p).is_file()}
        if present:
            for t in self.trackers:
                t.log_images(present, step)

    def finish(self, ok: bool = True) -> None:
        for t in self.trackers:
            t.finish(ok)
        self.trackers = []

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(ok=exc_type is None)


def open_tracking(
    names: Iterable[str],
    track: str | Path,
    *,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    resume_step: int | None = None,
) -> Tracking:
    """Open each named backend's run for the folder whose tracking folder is ``track``.

    ``resume_step``: the step a resumed run restarts after (None: a new run, or steps that
    are not re-run, as a search's trials). ``params``: the resolved config, logged once.
    """
    names = list(names)
    if not names:
        return Tracking()
    track = Path(track)
    track.mkdir(parents=True, exist_ok=True)
    state_path = track / "state.json"
    state = read_json(state_path) if state_path.is_file() else {}
    trackers = []
    try:
        for name in names:
            own = state.setdefault(name, {})
            trackers.append(TRACKERS[name](track, run_name, own, resume_step))
        atomic_write_json(state_path, state)
        tracking = Tracking(trackers, state, state_path)
        if params:
            tracking.log_params(params)
    except BaseException:
        for t in trackers:
            with contextlib.suppress(Exception):
                t.finish(ok=False)
        raise
    return tracking


def finite(value: Any) -> bool:
    """True for a finite number (the figures worth a metric)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
