"""Read back what each tracker wrote, with the tracker's own reader (for tests/test_tracking*.py).

W&B 0.31 ships no Python reader of an offline run: its ``run-ID.wandb`` file is a LevelDB-style
log of W&B's own protobuf records (``wandb.proto.wandb_internal_pb2.Record``), so the log's
framing is unpacked here and each record parsed with W&B's message class.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

__all__ = [
    "tensorboard_scalars",
    "tensorboard_images",
    "tensorboard_hparams",
    "mlflow_run",
    "wandb_runs",
    "trackio",
]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value)]`` as TensorBoard shows them (purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def tensorboard_images(folder: Path) -> set[str]:
    """The image tags TensorBoard shows for the run in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0})
    acc.Reload()
    return set(acc.Tags()["images"])


def tensorboard_hparams(folder: Path) -> dict[str, object]:
    """The HParams dashboard's hyperparameters of the run in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(folder))
    acc.Reload()
    out: dict[str, object] = {}
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        for name, value in data.session_start_info.hparams.items():
            out[name] = getattr(value, value.WhichOneof("kind"))
    return out


def mlflow_run(store: Path, run_id: str):
    """``(params, {key: [(step, value)]}, status, artifacts)`` through MLflow's client."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    run = client.get_run(run_id)
    history = {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
        for k in run.data.metrics
    }
    artifacts = [a.path for a in client.list_artifacts(run_id, "figures")]
    return run.data.params, history, run.info.status, artifacts


def _records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", ident
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_runs(folder: Path) -> list[dict]:
    """Each offline run under ``folder`` (oldest first): id, history by step, config, summary."""
    runs = []
    for path in sorted(folder.glob("offline-run-*/run-*.wandb")):
        run = {"id": None, "history": {}, "config": {}, "summary": {}, "resumed": False}
        for rec in _records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run["id"] = rec.run.run_id
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for i in rec.history.item}  # fmt: skip
                run["history"][rec.history.step.num] = row
            elif kind == "config":
                for item in rec.config.update:
                    run["config"][item.key] = json.loads(item.value_json)
            elif kind == "summary":
                for item in rec.summary.update:
                    run["summary"][item.key or "/".join(item.nested_key)] = json.loads(
                        item.value_json
                    )
        runs.append(run)
    return runs


def trackio(project: str, name: str):
    """``(rows, config)`` of a trackio run from its local store."""
    from trackio.sqlite_storage import SQLiteStorage

    return SQLiteStorage.get_logs(project, name), SQLiteStorage.get_run_config(project, name)
