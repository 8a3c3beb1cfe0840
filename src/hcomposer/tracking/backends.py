"""The trackers behind ``--report-to``, one class a backend (see :mod:`hcomposer.tracking`
for where each writes and how a resumed run continues): TensorBoard event files, a W&B run,
an MLflow run, a Trackio run. Each backend's package is imported when its tracker opens."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import secrets
import shutil
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hcomposer.errors import UserError

__all__ = ["Tracker", "TRACKERS", "PROJECT", "flatten", "import_backend", "installed"]

PROJECT = "hcomposer"

# MLflow refuses a parameter value longer than this.
_MAX_PARAM = 6000


def installed(name: str) -> bool:
    """True when the backend's package can be imported."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None (tests) or broken
        return False


def import_backend(name: str, module: str | None = None):
    """The backend's module; a one-line UserError naming the extra when it is missing."""
    try:
        return importlib.import_module(module or name)
    except ImportError:
        raise UserError(
            f"--report-to {name}: the {name} package is not installed; "
            f"install it with: pip install 'hcomposer[{name}]'"
        ) from None


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


@contextlib.contextmanager
def quiet_stdout():
    """Backends' banners go to stderr: stdout stays one JSON document under ``--json``."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def deprecated_quietly():
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
        writer = import_backend("tensorboard", "torch.utils.tensorboard").SummaryWriter
        # purge_step: events at or after it, left by a killed process, are hidden on reading.
        purge = None if resume_step is None else resume_step + 1
        self.writer = writer(log_dir=str(track / "tensorboard"), purge_step=purge)

    def log_params(self, params):
        summary = import_backend("tensorboard", "torch.utils.tensorboard.summary")
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
        image = import_backend("tensorboard", "matplotlib.image")
        for key, path in images.items():
            pixels = image.imread(str(path))
            self.writer.add_image(key, pixels[..., :3], step, dataformats="HWC")

    def log_text(self, texts, step):
        for key, text in texts.items():
            self.writer.add_text(key, text, step)

    def finish(self, ok=True):
        self.writer.close()


class _RunLogTracker(Tracker):
    """A backend whose run logs a dict at a step, images as its module's ``Image`` (W&B,
    and Trackio, which follows W&B's calls): ``self.module`` and ``self.run`` set on open."""

    module: Any
    run: Any

    def log_metrics(self, metrics, step):
        self.run.log(dict(metrics), step=step)

    def log_images(self, images, step):
        self.run.log({k: self.module.Image(str(p)) for k, p in images.items()}, step=step)

    def log_text(self, texts, step):
        self.run.log(dict(texts), step=step)


class WandbTracker(_RunLogTracker):
    name = "wandb"

    def __init__(self, track: Path, run_name: str, state: dict, resume_step: int | None):
        wandb = self.module = import_backend("wandb")
        self.track = track
        state.setdefault("id", secrets.token_hex(8))
        mode = None
        if not os.environ.get("WANDB_MODE"):
            # Online only for a user who has logged in (no prompt, no network check).
            mode = "online" if wandb.login(prompt=False, verify=False) else "offline"
        with quiet_stdout():
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

    def trial_callback(self, metric_names):
        callback = import_backend("wandb", "optuna_integration.wandb").WeightsAndBiasesCallback
        # return_previous: the callback logs into this run (wandb.run), it opens none; W&B
        # still lays out an empty run folder for that call, removed here.
        runs = self.track / "wandb"
        before = set(runs.glob("*run-*"))
        kwargs = {"reinit": "return_previous", "dir": str(self.track)}
        with deprecated_quietly():
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
        with quiet_stdout():
            self.run.finish(exit_code=0 if ok else 1)


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, track: Path, run_name: str, state: dict, resume_step: int | None):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (track / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode behind this switch; it needs
            # no database set-up (about 10 s of migrations for a new SQLite store).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.mlflow = import_backend("mlflow")
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
        callback = import_backend("mlflow", "optuna_integration.mlflow").MLflowCallback
        # One MLflow run per trial, a child of this one (the tag MLflow's UI nests by).
        kwargs = {"experiment_id": self.experiment_id,
                  "tags": {"mlflow.parentRunId": self.run_id}}  # fmt: skip
        with deprecated_quietly():
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


class TrackioTracker(_RunLogTracker):
    name = "trackio"

    def __init__(self, track: Path, run_name: str, state: dict, resume_step: int | None):
        trackio = self.module = import_backend("trackio")
        # Runs of many folders share trackio's store: the name is made unique once.
        state.setdefault("name", f"{run_name}-{secrets.token_hex(3)}")
        self.project = os.environ.get("TRACKIO_PROJECT", PROJECT)
        with quiet_stdout():
            self.run = trackio.init(
                project=self.project,
                name=state["name"],
                resume="allow",
                auto_log_cpu=False,
                auto_log_gpu=False,
            )
        storage = import_backend("trackio", "trackio.sqlite_storage").SQLiteStorage
        self.last_step = storage.get_last_step(self.project, state["name"])

    def log_params(self, params):
        # Trackio takes the config at init only; a config update is a new field of the run.
        self.run.config.update(flatten(params))

    def log_row(self, metrics, texts, step):
        # One call: trackio keeps each call as its own row, even at one step.
        self.run.log({**metrics, **texts}, step=step)

    def finish(self, ok=True):
        with quiet_stdout():
            if self.module.context_vars.current_run.get() is self.run:
                # Through the module: it also forgets the run, which atexit would finish again.
                self.module.finish()
            else:
                self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
    "trackio": TrackioTracker,
}
