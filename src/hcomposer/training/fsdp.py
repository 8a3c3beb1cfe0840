"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``hcomposer train --fsdp`` under torchrun.

Sharding: every residual block (``model.layers[i]``) is one FSDP unit, the root (embedding,
final norm, head; tied weights stay one parameter) another. Parameters, gradients and AdamW's
state live as ``DTensor`` shards (``Shard(0)``) on their ranks; a block's full weights exist
only while it runs.

Checkpoints: gathered into the ordinary checkpoint format (``hcomposer.training.checkpoint``),
written by rank 0. Each tensor is all-gathered in turn, moved to rank 0's host memory, and the
files are the same ``model.safetensors`` / ``optimizer.safetensors`` / ``state.json`` a single
process writes, so one format serves resume (with FSDP at any process count, with DDP, or in
one process), ``hcomposer export`` and ``hcomposer eval``. torch.distributed.checkpoint is not
used: its metadata file is a pickle, and this project never unpickles. The price: rank 0 needs
host memory for the full weights and optimiser state (16 bytes per parameter in fp32), and the
save is serial; per-rank shard files would lift that limit.

Loading: every rank builds the full model on the host from the seed (so the initial weights
equal DDP's and one process's exactly), loads checkpoint weights into it, then shards it;
optimiser state is read whole and each rank keeps its own shard.

Buffers are not sharded and FSDP does not synchronise them; the MoE selection bias is updated
from each rank's own tokens, so, as DDP does, rank 0's buffers are broadcast before every
forward (``sync_buffers``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = [
    "shard_model",
    "full_state",
    "load_optimizer_state",
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


def _full(t: torch.Tensor, main: bool) -> torch.Tensor | None:
    """The whole tensor on rank 0's host (None elsewhere); every rank must call it."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu().contiguous() if main else None


def full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model tensors, optimizer state dict) gathered whole on rank 0, empty elsewhere.

    The model tensors are keyed as ``safetensors.torch.save_model`` keys them (a tied
    parameter once, under its first name); the optimiser state dict is in
    ``torch.optim`` form (parameter indices), as a single process's would be.
    """
    main = dist.get_rank() == 0
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            continue
        seen.add(id(value))
        full = _full(value, main)
        if main:
            tensors[name] = full
    osd = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for idx in sorted(osd["state"]):
        per = {}
        for key in sorted(osd["state"][idx]):
            value = osd["state"][idx][key]
            per[key] = _full(value, main) if isinstance(value, torch.Tensor) else value
        state[idx] = per
    return (tensors, {"state": state, "param_groups": osd["param_groups"]}) if main else ({}, {})


def load_optimizer_state(optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> None:
    """Load a whole (single-process form) optimiser state, keeping each rank's shard."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for idx, per in full["state"].items():
        p = params[int(idx)]
        out = {}
        for key, value in per.items():
            if isinstance(p, DTensor) and isinstance(value, torch.Tensor) and value.dim() > 0:
                # Every rank holds the whole tensor (read from the file): take the local shard
                # without communication.
                value = distribute_tensor(
                    value.to(p.device_mesh.device_type),
                    p.device_mesh,
                    p.placements,
                    src_data_rank=None,
                )
            out[key] = value
        state[int(idx)] = out
    optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


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
