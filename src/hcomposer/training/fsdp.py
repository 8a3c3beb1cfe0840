"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``hcomposer train --fsdp`` under torchrun.

Sharding: every residual block (``model.layers[i]``) is one FSDP unit, the root (embedding,
final norm, head; tied weights stay one parameter) another. Parameters, gradients and AdamW's
state live as ``DTensor`` shards (``Shard(0)``) on their ranks; a block's full weights exist
only while it runs.

Checkpoints: the trainer writes them sharded (``hcomposer.training.sharded``: every rank its
own safetensors shards, nothing gathered); they load into FSDP at any process count, into DDP
and into one process (``hcomposer export``, ``hcomposer eval``).

Loading: every rank builds the full model on the host from the seed (so the initial weights
equal DDP's and one process's exactly), shards it, then loads the checkpoint into the shards.

Buffers are not sharded and FSDP does not synchronise them; the MoE selection bias is updated
from each rank's own tokens, so, as DDP does, rank 0's buffers are broadcast before every
forward (``sync_buffers``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

__all__ = [
    "shard_model",
    "sync_buffers",
    "no_gradient_sync",
]


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard ``model`` in place over all processes of the default group; returns it."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@torch.no_grad()
def sync_buffers(model: torch.nn.Module) -> None:
    """Broadcast rank 0's buffers (DDP's ``broadcast_buffers``): FSDP leaves them per rank."""
    for buf in model.buffers():
        if not isinstance(buf, DTensor):
            dist.broadcast(buf, src=0)


@contextlib.contextmanager
def no_gradient_sync(model: torch.nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (no reduce-scatter) inside, as DDP's ``no_sync``."""
    if not isinstance(model, FSDPModule):
        raise TypeError("no_gradient_sync needs a model sharded by shard_model")
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
