"""torchrun DDP on CPU (gloo, two processes) gives the losses of one process on the same batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hcomposer.architecture import Architecture
from hcomposer.data import embedded_corpus_text
from hcomposer.io import read_json, read_jsonl
from hcomposer.training.trainer import TrainConfig, train


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path, monkeypatch):
    data = tmp_path / "text.txt"
    data.write_text(embedded_corpus_text()[:30_000], encoding="utf-8")
    monkeypatch.setenv("HCOMPOSER_CACHE", str(tmp_path / "cache"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        "train",
        "AF",
        "--shape",
        "tiny",
        "--data",
        str(data),
        "--tokens",
        "768",
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
    ddp = subprocess.run(
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
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # The same run in this process: one rank, the whole global batch.
    config = TrainConfig(
        tokens=768,
        batch_size=4,
        seq_len=32,
        dtype="fp32",
        log_every=1,
        eval_every=0,
        eval_tokens=128,
        data=str(data),
        lr=1e-3,
        min_lr=1e-4,
    )
    single = train(Architecture.parse("AF", shape="tiny"), config, tmp_path / "one", progress=False)
    one = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "one" / "metrics.jsonl")}
    two = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl")}
    assert list(one) == list(range(1, 7)) and one.keys() == two.keys()
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    assert read_json(tmp_path / "two" / "status.json")["status"] == "completed"
    assert read_json(tmp_path / "two" / "summary.json")["val_loss"] == pytest.approx(
        single.val_loss, rel=1e-5
    )
