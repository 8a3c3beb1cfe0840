"""torchrun DDP on CPU (gloo, two processes) gives the losses of one process on the same batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hcomposer.data import embedded_corpus_text
from hcomposer.io import read_json, read_jsonl


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(embedded_corpus_text()[:30_000], encoding="utf-8")
    env = {**os.environ, "HCOMPOSER_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = [
        "train",
        "AF",
        "--shape",
        "tiny",
        "--data",
        str(data),
        "--tokens",
        "1024",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--dtype",
        "fp32",
        "--log-every",
        "1",
        "--eval-every",
        "0",
        "--eval-tokens",
        "128",
        "--no-progress",
        "--json",
    ]
    single = _run(
        [sys.executable, "-m", "hcomposer.cli", *args, "--out", str(tmp_path / "one")], env
    )
    assert single.returncode == 0, single.stderr
    ddp = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "hcomposer.cli",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        env,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "one" / "metrics.jsonl")}
    two = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl")}
    assert list(one) == list(range(1, 9)) and one.keys() == two.keys()
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    assert read_json(tmp_path / "two" / "status.json")["status"] == "completed"
    s1 = read_json(tmp_path / "one" / "summary.json")
    s2 = read_json(tmp_path / "two" / "summary.json")
    assert s2["val_loss"] == pytest.approx(s1["val_loss"], rel=1e-5)
