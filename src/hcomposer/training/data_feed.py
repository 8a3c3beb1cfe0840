"""The trainer's batch sources: token shards or a streamed source, each rank's micro-batches
of a global batch, and the data position a checkpoint records.

Batch ``k`` is a pure function of (seed, k) for token shards; a streamed source (``hf:``,
:mod:`hcomposer.data.stream`) also saves its position (next record and token) with each
checkpoint, so a resumed run reads on where it stopped.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from hcomposer.config_io import read_run_file
from hcomposer.data import StreamingDataset, is_streamed, prepare_dataset, resolve_source
from hcomposer.errors import UserError
from hcomposer.io import entry_lock
from hcomposer.runs import RUN_JSON
from hcomposer.training.config import TrainConfig
from hcomposer.training.distributed import Distributed

__all__ = ["open_dataset", "check_same_data", "micro_batches", "data_state", "restore_data"]


def open_dataset(config: TrainConfig, tokenizer, dist: Distributed):
    """The dataset of ``config.data``: its token shards (built by rank 0 or found), or a
    streamed source. Every rank checks the source, so bad input fails everywhere."""
    shards = config.data is not None and (Path(config.data) / "manifest.json").is_file()
    source = None if shards else resolve_source(config.data)
    if source is not None and is_streamed(source):
        # An hf: source is streamed (hcomposer.data.stream): nothing is downloaded or
        # tokenised ahead; its position is saved with each checkpoint.
        dataset = StreamingDataset(source, tokenizer, config.val_fraction, config.seed)
        dataset.check_lengths(config.seq_len, config.eval_tokens)
        return dataset
    return _shards(config, tokenizer, dist)


def _shards(config, tokenizer, dist):
    """Rank 0 tokenises ``config.data`` into shards (or finds them); the others then open them."""
    t_data = time.time()
    if dist.main:
        dataset = prepare_dataset(config.data, tokenizer, None, config.val_fraction, config.seed)
    dist.barrier()
    if not dist.main:
        dataset = prepare_dataset(config.data, tokenizer, None, config.val_fraction, config.seed)
    try:
        for split in ("train", "val"):
            dataset.check_len(dataset.split(split), split, config.seq_len)
    except UserError:
        # Shards built just now from a source too small to train on: leave nothing behind.
        manifest = Path(dataset.path) / "manifest.json"
        fresh = manifest.is_file() and manifest.stat().st_mtime >= t_data - 1
        if dist.main and fresh and Path(dataset.path) != Path(str(config.data)):
            # Under the entry's lock, which then goes too.
            with entry_lock(dataset.path):
                shutil.rmtree(dataset.path, ignore_errors=True)
        raise
    return dataset


def check_same_data(out: Path, dataset) -> None:
    """Refuse to resume the run in ``out`` on data other than it started on."""
    stored = read_run_file(out, RUN_JSON, keys=("config",), versioned=True)["config"]
    started_on = (stored.get("dataset") or {}).get("sha256") if isinstance(stored, dict) else None
    if started_on is not None and started_on != dataset.manifest.get("sha256"):
        raise UserError(
            f"--resume: the data of the run in {str(out)!r} changed since it started "
            "(token shard checksums differ); restore the data or start a new run"
        )


def micro_batches(
    dataset, step: int, config: TrainConfig, rows: slice, micro: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's ``rows`` of global batch ``step``, split into ``grad_accum`` micro-batches."""
    x_all, y_all = dataset.batch_at(
        "train", step, config.batch_size, config.seq_len, seed=config.seed
    )
    x_all, y_all = x_all[rows].to(device), y_all[rows].to(device)
    return [
        (x_all[k * micro : (k + 1) * micro], y_all[k * micro : (k + 1) * micro])
        for k in range(config.grad_accum)
    ]


def data_state(dataset, config: TrainConfig, step: int) -> dict[str, Any]:
    """What a checkpoint at ``step`` records of the data: the seed and the next batch, and a
    streamed source's position (the next record and token)."""
    data: dict[str, Any] = {"seed": config.seed, "next_batch": step}
    if isinstance(dataset, StreamingDataset):
        data.update(dataset.state_dict())
    return data


def restore_data(dataset, data: dict[str, Any]) -> None:
    """Put a streamed source back at the position a checkpoint recorded (shards need nothing)."""
    if isinstance(dataset, StreamingDataset):
        dataset.load_state_dict(data)
