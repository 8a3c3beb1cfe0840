"""The checks a training run makes before it writes anything: the output folder (resume only
what it holds), the tokenizer and architecture, how the batch splits over processes and
micro-steps, options that do not go together, the data and the device's precision."""

from __future__ import annotations

from pathlib import Path

import torch

from hcomposer.data import get_tokenizer, load_tokenizer
from hcomposer.errors import UserError
from hcomposer.primitives import primitive_class
from hcomposer.runs import RunDir
from hcomposer.training.checkpoint import usable_checkpoint
from hcomposer.training.config import RESUMABLE_CHANGES, TrainConfig, resolve_arch
from hcomposer.training.data_feed import check_same_data, open_dataset
from hcomposer.training.distributed import Distributed
from hcomposer.training.out_dir import check_out_dir

__all__ = ["check_inputs"]


def check_inputs(arch, config: TrainConfig, out: Path, dist: Distributed, resume: bool):
    """``(has_run, tokenizer, arch, checkpoint, micro-batch, dataset)`` of a run about to start."""
    # Every check that can fail on bad input runs before anything is written.
    has_run = check_out_dir(out, arch, config.to_dict(), resume, RESUMABLE_CHANGES)
    if has_run:
        tokenizer = load_tokenizer(RunDir(out).tokenizer)
        arch = RunDir(out).read_architecture()
    else:
        tokenizer = get_tokenizer(config.tokenizer, source=config.data)
        arch = resolve_arch(arch, tokenizer, config.seq_len)
    # A truncated or tampered checkpoint is refused here, before anything is written, unless
    # the previous one is whole (then that one is used, and the user told).
    ckpt = usable_checkpoint(out, tell=dist.main) if has_run else None
    if config.batch_threads > 1 and dist.enabled:
        raise UserError(
            f"--batch-threads {config.batch_threads} does not work in a distributed run "
            "(torchrun); leave it at 1"
        )
    if config.batch_threads > 1:
        stateful = sorted(
            {t for layer in arch.layers for t in layer if primitive_class(t).forward_updates_state}
        )
        if stateful:
            # Concurrent forwards of one model would race on that state (MoE routing).
            raise UserError(
                f"--batch-threads {config.batch_threads} does not work with {', '.join(stateful)} "
                "layers (their forward updates shared state); leave it at 1"
            )
    if config.fsdp and not dist.enabled:
        raise UserError(
            "--fsdp shards the model over torchrun's processes: run it under "
            "`torchrun --nproc_per_node N` with N >= 2"
        )
    micro, rem = divmod(config.batch_size, dist.world * config.grad_accum)
    if rem or micro == 0:
        raise UserError(
            f"batch size {config.batch_size} does not split into {dist.world} process(es) x "
            f"{config.grad_accum} accumulation steps"
        )
    dataset = open_dataset(config, tokenizer, dist)
    if has_run:
        check_same_data(out, dataset)
    device = dist.device
    if config.dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{torch.cuda.get_device_name(device)} has no bf16; pass --dtype fp32")
    return has_run, tokenizer, arch, ckpt, micro, dataset
