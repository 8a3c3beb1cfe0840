"""torchrun's environment for the trainer: rank, world size, device and the collectives it needs."""

from __future__ import annotations

import os

import torch

from hcomposer.training.step import resolve_device

__all__ = ["Distributed"]


class Distributed:
    """One process of a torchrun job (or the only process: ``world == 1``, collectives no-ops).

    Joins the process group when torchrun started several processes and none is open yet
    (NCCL on CUDA, gloo on CPU); :meth:`close` leaves it only if this object opened it.
    """

    def __init__(self, device_spec: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device_spec, self.local_rank)
        self.enabled = self.world > 1
        self.owns_group = False
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group(backend=backend)
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.world
        return value

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()
