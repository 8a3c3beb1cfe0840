"""The memory guard reads psutil (works on macOS as on Linux): known readings give known
decisions, and on Linux psutil's figure is /proc/meminfo's MemAvailable."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from hcomposer.errors import UserError
from hcomposer.guards import check_memory, memory_available

GiB = 2**30


@pytest.fixture
def free_8gib(monkeypatch):
    monkeypatch.delenv("HCOMPOSER_SKIP_MEMORY_CHECK", raising=False)
    fake = SimpleNamespace(available=8 * GiB, total=16 * GiB)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake)
    return monkeypatch


def test_available_memory_is_psutils(free_8gib):
    assert memory_available() == 8 * GiB


def test_work_that_fits_passes_and_more_is_refused(free_8gib):
    check_memory(8 * GiB, "a fit")
    with pytest.raises(UserError, match=r"needs about 8\.5 GiB of memory and 8\.0 GiB is free"):
        check_memory(8.5 * GiB, "training 4 x 2048 tokens per micro-step")
    free_8gib.setenv("HCOMPOSER_SKIP_MEMORY_CHECK", "1")
    check_memory(1000 * GiB, "anything")


def test_unknown_memory_refuses_nothing(monkeypatch):
    monkeypatch.delenv("HCOMPOSER_SKIP_MEMORY_CHECK", raising=False)

    def fails():
        raise OSError("no /proc/meminfo")

    monkeypatch.setattr(psutil, "virtual_memory", fails)
    assert memory_available() is None
    check_memory(1000 * GiB, "anything")


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux only")
def test_on_linux_it_is_memavailable():
    def meminfo() -> int:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        pytest.skip("kernel without MemAvailable")

    before, got, later = meminfo(), memory_available(), meminfo()
    # Other processes allocate in between: within 64 MiB of both readings' range.
    assert min(before, later) - 64 * 2**20 <= got <= max(before, later) + 64 * 2**20
