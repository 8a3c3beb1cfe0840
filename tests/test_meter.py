"""A training run's MFU and peak memory (training/meter.py)."""

import pytest
import torch

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.training.meter import Meter, matmul_peak


def test_the_peak_is_measured_once_per_device_and_precision():
    cpu = torch.device("cpu")
    first = matmul_peak(cpu, "fp32")
    assert first > 0
    assert matmul_peak(cpu, "fp32") == first  # read back, not timed again


def test_mfu_is_three_forwards_of_flops_over_the_peak():
    arch = Architecture.parse("AF", shape="tiny")
    meter = Meter(arch, 64, torch.device("cpu"), "fp32")
    per_token = 3.0 * count_costs(arch, seq_len=64).flops_per_token
    assert meter.mfu(1000.0) == pytest.approx(per_token * 1000.0 / meter.peak_flops)
    assert meter.peak_mem_mib() > 0
