"""Per-record hardware figures of a training run: model FLOP utilisation and peak memory.

- ``mfu``: achieved model FLOP/s over this device's matmul peak, both measured here. The model's
  FLOP/s are 3 x accounting's forward FLOPs per token at the run's sequence length (forward +
  backward = 3 forwards) x tokens per second; the peak is the best of three square matmuls
  (1024 on a CPU, 4096 on a GPU) in the run's precision, timed once when the run starts, so
  the figure is a fraction of what this device did, not of a data-sheet number.
- ``peak_mem_mib``: on CUDA ``torch.cuda.max_memory_allocated`` (tensors only) since the run
  started; on a CPU the process's peak resident set (``ru_maxrss``), which includes everything
  the process has held.
"""

from __future__ import annotations

import functools
import resource
import sys
import time

import torch

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture

__all__ = ["Meter", "matmul_peak"]

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def matmul_peak(device: torch.device, precision: str) -> float:
    """FLOP/s of the best of three n x n x n matmuls in ``precision`` (after a warm-up),
    measured once per process, device and precision: a sweep's or a study's many runs
    share one figure instead of timing it again at every start."""
    return _matmul_peak(str(device), precision)


@functools.cache
def _matmul_peak(device_name: str, precision: str) -> float:
    device = torch.device(device_name)
    n = 4096 if device.type == "cuda" else 1024
    dtype = _DTYPES.get(precision, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first is the warm-up (allocation, kernel choice)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / max(best, 1e-12)


class Meter:
    """The MFU and peak memory of one run's records (see the module docstring)."""

    def __init__(self, arch: Architecture, seq_len: int, device: torch.device, precision: str):
        self.device = device
        self.flops_per_token = 3.0 * count_costs(arch, seq_len=seq_len).flops_per_token
        self.peak_flops = matmul_peak(device, precision)

    def mfu(self, tokens_per_s: float) -> float:
        return self.flops_per_token * tokens_per_s / self.peak_flops

    def peak_mem_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        # ru_maxrss is in KiB on Linux, bytes on macOS.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / (2**20 if sys.platform == "darwin" else 2**10)
