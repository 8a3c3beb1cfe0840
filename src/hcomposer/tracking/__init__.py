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
import importlib
import importlib.util
import math
import os
import secrets
import shutil
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hcomposer.errors import UserError
from hcomposer.io import atomic_write_json, read_json

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
PROJECT = "hcomposer"
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
# MLflow refuses a parameter value longer than this.
_MAX_PARAM = 6000


def installed(name: str) -> bool:
    """True when the backend's package can be imported."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None (tests) or broken
        return False


def _import(name: str, module: str | None = None):
    """The backend's module; a one-line UserError naming the extra when it is missing."""
    try:
        return importlib.import_module(module or name)
    except ImportError:
        raise UserError(
            f"--report-to {name}: the {name} package is not installed; "
            f"install it with: pip install 'hcomposer[{name}]'"
        ) from None


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
        _import(name)
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


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``; lists and None become text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)[:_MAX_PARAM]
    return out


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries as floats (None and text left out; NaN kept: it is the news)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


@contextlib.contextmanager
def _quiet_stdout():
    """Backends' banners go to stderr: stdout stays one JSON document under ``--json``."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def _deprecated_quietly():
    """optuna-integration 4.9 marked its W&B and MLflow callbacks deprecated (removal planned
    for 6.0); they still do the job, and the user can do nothing about the warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*Callback has been deprecated", category=FutureWarning
        )
        yield


class Tracker:
    """One backend's run. ``last_step``: the highest step it already held when opened."""

    name = ""
    last_step: int | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def log_images(self, images: Mapping[str, Path], step: int) -> None:
        raise NotImplementedError

    def log_text(self, texts: Mapping[str, str], step: int) -> None:
        raise NotImplementedError

    def trial_callback(self, metric_names: list[str]):
        """optuna-integration's callback ``(study, frozen_trial)`` for this backend, or None:
        a search then sends each trial through :meth:`log_metrics` and :meth:`log_text`."""
        return None

    def log_trial(self, callback, study, trial, texts: Mapping[str, str]) -> None:
        """One trial through this backend's callback (see :meth:`Tracking.log_trial`)."""
        callback(study, trial)

    def log_row(self, metrics: Mapping[str, float], texts: Mapping[str, str], step: int) -> None:
        """Numbers and text of one step (a trial without a callback)."""
        if metrics:
            self.log_metrics(metrics, step)
        self.log_text(texts, step)

    def finish(self, ok: bool = True) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, track: Path, run_name: str, state: dict, resume_step: int | None):
        writer = _import("tensorboard", "torch.utils.tensorboard").SummaryWriter
        # purge_step: events at or after it, left by a killed process, are hidden on reading.
        purge = None if resume_step is None else resume_step + 1
        self.writer = writer(log_dir=str(track / "tensorboard"), purge_step=purge)

    def log_params(self, params):
        summary = _import("tensorboard", "torch.utils.tensorboard.summary")
        flat = {k: v for k, v in flatten(params).items()}
        # The HParams dashboard's session, in this run's own event file (add_hparams would
        # start another run folder); the metrics it lists are the scalars logged by step.
        metrics = {"train/loss": 0.0, "val/loss": 0.0}
        for event in summary.hparams(flat, metrics):
            self.writer.file_writer.add_summary(event)
        self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in flat.items()))

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_images(self, images, step):
        image = _import("tensorboard", "matplotlib.image")
        for key, path in images.items():
            pixels = image.imread(str(path))
            self.writer.add_image(key, pixels[..., :3], step, dataformats="HWC")

    def log_text(self, texts, step):
        for key, text in texts.items():
            self.writer.add_text(key, text, step)

    def finish(self, ok=True):
        self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, track: Path, run_name: str, state: dict, resume_step: int | None):
        wandb = self.wandb = _import("wandb")
        self.track = track
        state.setdefault("id", secrets.token_hex(8))
        mode = None
        if not os.environ.get("WANDB_MODE"):
            # Online only for a user who has logged in (no prompt, no network check).
            mode = "online" if wandb.login(prompt=False, verify=False) else "offline"
        with _quiet_stdout():
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", PROJECT),
                name=run_name,
                id=state["id"],
                resume="allow",
                dir=str(track),
                mode=mode,
                settings=wandb.Settings(console="off", silent=True),
            )
        step = int(getattr(self.run, "step", 0) or 0)
        self.last_step = step - 1 if step > 0 else None

    def log_params(self, params):
        self.run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, metrics, step):
        self.run.log(dict(metrics), step=step)

    def log_images(self, images, step):
        self.run.log({k: self.wandb.Image(str(p)) for k, p in images.items()}, step=step)

    def log_text(self, texts, step):
        self.run.log(dict(texts), step=step)

    def trial_callback(self, metric_names):
        callback = _import("wandb", "optuna_integration.wandb").WeightsAndBiasesCallback
        # return_previous: the callback logs into this run (wandb.run), it opens none; W&B
        # still lays out an empty run folder for that call, removed here.
        runs = self.track / "wandb"
        before = set(runs.glob("*run-*"))
        kwargs = {"reinit": "return_previous", "dir": str(self.track)}
        with _deprecated_quietly():
            made = callback(metric_names, wandb_kwargs=kwargs)
        for stub in set(runs.glob("*run-*")) - before:
            if stub.is_dir() and not any(stub.glob("*.wandb")):
                shutil.rmtree(stub, ignore_errors=True)
        return made

    def log_trial(self, callback, study, trial, texts):
        # Uncommitted: the callback's row at the same step then carries the pattern too.
        self.run.log(dict(texts), step=trial.number, commit=False)
        callback(study, trial)

    def finish(self, ok=True):
        with _quiet_stdout():
            self.run.finish(exit_code=0 if ok else 1)


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, track: Path, run_name: str, state: dict, resume_step: int | None):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (track / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode behind this switch; it needs
            # no database set-up (about 10 s of migrations for a new SQLite store).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.mlflow = _import("mlflow")
        self.client = client = self.mlflow.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        run_id = state.get("run_id") if state.get("uri") == uri else None
        if run_id is None:
            run_id = client.create_run(exp_id, run_name=run_name).info.run_id
        else:
            client.update_run(run_id, status="RUNNING")
            steps = [
                m.step for key in client.get_run(run_id).data.metrics
                for m in client.get_metric_history(run_id, key)
            ]  # fmt: skip
            self.last_step = max(steps) if steps else None
        state.update(uri=uri, run_id=run_id, experiment_id=exp_id)
        self.run_id, self.uri, self.experiment_id = run_id, uri, exp_id

    def log_params(self, params):
        have = self.client.get_run(self.run_id).data.params
        # A parameter is written once in MLflow: a resumed run adds only new ones.
        items = [
            self.mlflow.entities.Param(k, str(v)[:_MAX_PARAM])
            for k, v in flatten(params).items()
            if k not in have
        ]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 parameters
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics, step):
        now = int(time.time() * 1000)
        Metric = self.mlflow.entities.Metric
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_images(self, images, step):
        for path in images.values():
            self.client.log_artifact(self.run_id, str(path), artifact_path="figures")

    def log_text(self, texts, step):
        for key, text in texts.items():
            self.client.log_text(self.run_id, text, f"text/{key.replace('/', '_')}-{step}.txt")

    def trial_callback(self, metric_names):
        callback = _import("mlflow", "optuna_integration.mlflow").MLflowCallback
        # One MLflow run per trial, a child of this one (the tag MLflow's UI nests by).
        kwargs = {"experiment_id": self.experiment_id,
                  "tags": {"mlflow.parentRunId": self.run_id}}  # fmt: skip
        with _deprecated_quietly():
            return callback(self.uri, metric_names, create_experiment=False, mlflow_kwargs=kwargs)

    def log_trial(self, callback, study, trial, texts):
        before = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            callback(study, trial)
        finally:
            # The callback sets MLflow's process-wide URI, environment variable included: put
            # back the user's, so a later run in this process opens its own store.
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before

    def finish(self, ok=True):
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self, track: Path, run_name: str, state: dict, resume_step: int | None):
        trackio = self.trackio = _import("trackio")
        # Runs of many folders share trackio's store: the name is made unique once.
        state.setdefault("name", f"{run_name}-{secrets.token_hex(3)}")
        self.project = os.environ.get("TRACKIO_PROJECT", PROJECT)
        with _quiet_stdout():
            self.run = trackio.init(
                project=self.project,
                name=state["name"],
                resume="allow",
                auto_log_cpu=False,
                auto_log_gpu=False,
            )
        storage = _import("trackio", "trackio.sqlite_storage").SQLiteStorage
        self.last_step = storage.get_last_step(self.project, state["name"])

    def log_params(self, params):
        # Trackio takes the config at init only; a config update is a new field of the run.
        self.run.config.update(flatten(params))

    def log_metrics(self, metrics, step):
        self.run.log(dict(metrics), step=step)

    def log_images(self, images, step):
        self.run.log({k: self.trackio.Image(str(p)) for k, p in images.items()}, step=step)

    def log_text(self, texts, step):
        self.run.log(dict(texts), step=step)

    def log_row(self, metrics, texts, step):
        # One call: trackio keeps each call as its own row, even at one step.
        self.run.log({**metrics, **texts}, step=step)

    def finish(self, ok=True):
        with _quiet_stdout():
            if self.trackio.context_vars.current_run.get() is self.run:
                # Through the module: it also forgets the run, which atexit would finish again.
                self.trackio.finish()
            else:
                self.run.finish()


_CLASSES: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
    "trackio": TrackioTracker,
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
            trackers.append(_CLASSES[name](track, run_name, own, resume_step))
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
