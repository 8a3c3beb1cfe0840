"""--report-to: what each tracker holds, read back with its own reader, equals metrics.jsonl;
a resumed run appends without logging a step twice; a missing package is a one-line error."""

from __future__ import annotations

import json
import math
import sys

import pytest

import tracking_readers as read
from hcomposer import Architecture
from hcomposer.cli import main
from hcomposer.errors import UserError
from hcomposer.io import read_json, read_jsonl
from hcomposer.tracking import BACKENDS, STEP_KEYS, parse_report_to
from hcomposer.training.trainer import TrainConfig, Trainer, train

for _name in BACKENDS:
    pytest.importorskip(_name)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Trackers that write only under tmp_path: W&B offline, trackio's store moved there."""
    import trackio
    import trackio.sqlite_storage
    import trackio.utils

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    store = tmp_path / "trackio-store"
    monkeypatch.setenv("TRACKIO_DIR", str(store))
    for mod in (trackio, trackio.utils, trackio.sqlite_storage):
        monkeypatch.setattr(mod, "TRACKIO_DIR", store)
    return tmp_path


def _config(**kw) -> TrainConfig:
    base = dict(
        tokens=4 * 32 * 12, batch_size=4, seq_len=32, log_every=2, eval_every=6,
        eval_tokens=256, checkpoint_every=0, threads=1, dtype="fp32", warmup=2,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _logged(out) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as ``tracker name -> [(step, value)]``."""
    series: dict[str, list[tuple[int, float]]] = {}
    for rec in read_jsonl(out / "metrics.jsonl"):
        for key, name in STEP_KEYS.items():
            if isinstance(rec.get(key), (int, float)):
                series.setdefault(name, []).append((rec["step"], float(rec[key])))
    return series


def _same(got, want, rel=1e-6) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=rel)


def test_train_logs_the_same_numbers_to_every_tracker(isolated, capsys):
    out = isolated / "run"
    arch = Architecture.parse("AFAF", shape="tiny")
    train(arch, _config(), out, progress=False, report_to=BACKENDS)
    # The trackers' banners go to stderr: a command's --json output stays alone on stdout.
    assert capsys.readouterr().out == ""
    want = _logged(out)
    recs = [r for r in read_jsonl(out / "metrics.jsonl") if "mfu" in r]
    # The hardware figures are in every logged record: a fraction of the measured peak.
    assert recs and all(0 < r["mfu"] < 1 and r["peak_mem_mib"] > 10 for r in recs)
    assert set(want) == set(STEP_KEYS.values())
    track = out / "tracking"
    state = read_json(track / "state.json")

    tb = read.tensorboard_scalars(track / "tensorboard")
    for name, series in want.items():
        _same(tb[name], series)
    hp = read.tensorboard_hparams(track / "tensorboard")
    assert hp["train.lr"] == pytest.approx(1e-3) and hp["architecture.pattern"] == "AFAF"

    params, history, status, _ = read.mlflow_run(track / "mlruns", state["mlflow"]["run_id"])
    for name, series in want.items():
        _same(history[name], series)
    assert params["train.seq_len"] == "32" and status == "FINISHED"

    (wb,) = read.wandb_runs(track / "wandb")
    assert wb["id"] == state["wandb"]["id"]
    for name, series in want.items():
        got = [(s, row[name]) for s, row in sorted(wb["history"].items()) if name in row]
        _same(got, series)
    assert wb["config"]["train"]["batch_size"] == 4
    assert wb["summary"]["train/loss"] == pytest.approx(want["train/loss"][-1][1])

    rows, config = read.trackio("hcomposer", state["trackio"]["name"])
    for name, series in want.items():
        _same([(r["step"], r[name]) for r in rows if name in r], series)
    assert config["train.tokens"] == 4 * 32 * 12


def test_resume_appends_and_logs_no_step_twice(isolated, monkeypatch):
    """A run killed after step 8 with its last checkpoint at step 4, then resumed: the steps 6
    and 8 run again and must not reach a tracker twice."""
    out = isolated / "run"
    arch = Architecture.parse("AFAF", shape="tiny")
    cfg = _config(checkpoint_every=4)
    save = Trainer.checkpoint
    monkeypatch.setattr(
        Trainer, "checkpoint", lambda self, step: None if step == 8 else save(self, step)
    )
    names = ("tensorboard", "mlflow", "trackio", "wandb")
    first = train(arch, cfg, out, progress=False, stop_at=8, report_to=names)
    assert first.step == 8
    monkeypatch.setattr(Trainer, "checkpoint", save)
    done = train(arch, cfg, out, resume=True, progress=False, report_to=names)
    assert done.status == "completed"
    want = _logged(out)
    assert [s for s, _ in want["train/loss"]] == [2, 4, 6, 8, 10, 12]
    track = out / "tracking"
    state = read_json(track / "state.json")
    tb = read.tensorboard_scalars(track / "tensorboard")
    _, history, _, _ = read.mlflow_run(track / "mlruns", state["mlflow"]["run_id"])
    rows, _ = read.trackio("hcomposer", state["trackio"]["name"])
    trackio_loss = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    # Exact resume (fp32, one thread): the re-run steps equal the first ones, so whichever
    # copy a tracker kept, its series equals metrics.jsonl, each step once.
    for got in (tb["train/loss"], history["train/loss"], trackio_loss):
        _same(got, want["train/loss"])
    _same(tb["val/loss"], want["val/loss"])
    # W&B offline: one folder per process, the same run id; the second starts after the
    # checkpoint (W&B drops its steps 6 and 8, already held, when both are synced).
    a, b = read.wandb_runs(track / "wandb")
    assert a["id"] == b["id"] == state["wandb"]["id"]
    assert sorted(a["history"]) == [2, 4, 6, 8] and sorted(b["history"]) == [6, 8, 10, 12]


def test_report_to_values():
    assert parse_report_to("none") == ()
    assert parse_report_to("all") == BACKENDS  # every one is installed here
    assert parse_report_to(" MLflow, tensorboard,mlflow") == ("mlflow", "tensorboard")
    assert parse_report_to(None) == ("tensorboard",)
    for bad in ("", "comet", "all,wandb", "none,tensorboard"):
        with pytest.raises(UserError, match="--report-to"):
            parse_report_to(bad)


def test_missing_package_is_one_line_error(tmp_path, monkeypatch, capsys):
    # A package that cannot be imported (as when the extra is not installed).
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert parse_report_to("all") == tuple(n for n in BACKENDS if n != "wandb")
    out = tmp_path / "run"
    args = ["--shape", "tiny", "--tokens", "1K", "--batch-size", "2", "--seq-len", "16"]
    code = main(["train", "AF", *args, "--out", str(out), "--report-to", "tensorboard,wandb"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "wandb package is not installed" in err and "hcomposer[wandb]" in err
    assert not out.exists()
    # Without tensorboard, the default is no tracker at all (not an error).
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert parse_report_to(None) == ()


def test_cli_default_is_tensorboard(isolated, capsys):
    out = isolated / "run"
    code = main(["train", "AF", "--shape", "tiny", "--tokens", "512", "--batch-size", "2",
                 "--seq-len", "16", "--log-every", "4", "--out", str(out), "--json"])  # fmt: skip
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    tb = read.tensorboard_scalars(out / "tracking" / "tensorboard")
    assert tb["train/loss"][-1] == (16, pytest.approx(doc["loss"], rel=1e-6))
    assert math.isfinite(doc["loss"])
    assert sorted(p.name for p in (out / "tracking").iterdir()) == ["state.json", "tensorboard"]
