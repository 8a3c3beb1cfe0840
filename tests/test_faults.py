"""Faults in flight: a trial whose loss turns NaN, a disk that fills during a checkpoint write,
eight workers on one SQLite study, a damaged latest checkpoint, a second process on a run
folder in use."""

from __future__ import annotations

import errno
import math
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

import hcomposer.training.checkpoint as checkpoint_module
from hcomposer.architecture import Architecture
from hcomposer.cli import main
from hcomposer.data import embedded_corpus_text
from hcomposer.errors import UserError
from hcomposer.io import append_jsonl, current_umask, read_json, read_jsonl
from hcomposer.model import build_model
from hcomposer.runs import HOLDER, FolderLock
from hcomposer.search import SearchConfig, load_trials, run_search
from hcomposer.search.objectives import synthetic_score
from hcomposer.training.checkpoint import find_checkpoint, read_state
from hcomposer.training.trainer import TrainConfig, load_run, train

POISONED = "AAA"


def nan_loss_objective(arch: Architecture, proxy: str, seed: int) -> dict:
    """A real (tiny) loss; for one pattern a weight is NaN, so the loss turns NaN."""
    model = build_model(arch.with_shape(arch.shape.replace(vocab_size=32)), seed=seed)
    if arch.pattern == POISONED:
        with torch.no_grad():
            next(model.parameters()).fill_(math.nan)
    x = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    return {"score": -float(loss) + synthetic_score(arch.pattern, seed)}


def test_a_trial_whose_loss_turns_nan_fails_with_its_reason_and_the_search_goes_on(tmp_path):
    config = SearchConfig(
        primitives="AF", layers=3, trials=7, sampler="random", shape="tiny",
        proxy="synthetic", seed=0,
    )  # fmt: skip
    # 7 trials of a space of 2**3 = 8 patterns: every pattern but the poisoned one must
    # complete, so the search has to go on past the failure (the sampler meets AAA on the way).
    result = run_search(config, tmp_path / "s", objective=nan_loss_objective, progress=False)
    trials = load_trials(tmp_path / "s")
    failed = [t for t in trials if t["state"] == "FAIL"]
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert failed and {t["pattern"] for t in failed} == {POISONED}
    assert all("nan" in t["failure"].lower() for t in failed)
    assert len(done) == 7 and POISONED not in {t["pattern"] for t in done}
    assert all(math.isfinite(t["score"]) for t in done)
    assert result.best["pattern"] != POISONED


def _config(text_file, **kw) -> TrainConfig:
    base = dict(
        tokens=6 * 4 * 32, batch_size=4, seq_len=32, lr=3e-3, min_lr=3e-4, warmup=1,
        dtype="fp32", eval_every=0, eval_tokens=256, log_every=1, checkpoint_every=1,
        data=str(text_file),
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "austen.txt"
    path.write_text(embedded_corpus_text()[:40_000], encoding="utf-8")
    return path


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_resume_works(
    tmp_path, text_file, monkeypatch
):
    arch = Architecture.parse("AF", shape="tiny")
    cfg = _config(text_file)
    straight = train(arch, cfg, tmp_path / "straight", progress=False)
    out = tmp_path / "run"
    train(arch, cfg, out, progress=False, stop_at=2)
    before = read_state(find_checkpoint(out))
    assert before["step"] == 2
    # Run folders follow the user's umask (mkdtemp/mkstemp alone would make them private).
    mask = current_umask()
    assert stat.S_IMODE((out / "checkpoint").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "run.json").stat().st_mode) == 0o666 & ~mask

    real_save = checkpoint_module.save_file
    calls = {"n": 0}

    def full_disk(tensors, filename, *a, **kw):
        # The optimiser file: half of it reaches the disk, then the disk is full.
        calls["n"] += 1
        real_save(tensors, filename, *a, **kw)
        with open(filename, "r+b") as f:
            f.truncate(max(1, f.seek(0, 2) // 2))
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(OSError) as err:
        train(arch, cfg, out, resume=True, progress=False, stop_at=3)
    assert err.value.errno == errno.ENOSPC and calls["n"] == 1
    monkeypatch.undo()

    # The previous checkpoint is whole (checksums pass), and no partial folder is left.
    assert read_state(find_checkpoint(out))["step"] == 2
    assert not list(out.glob(".checkpoint.tmp-*"))
    resumed = train(arch, cfg, out, resume=True, progress=False)
    assert resumed.status == "completed" and resumed.step == straight.step
    losses = {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl")}
    assert losses == {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "straight/metrics.jsonl")}
    m1, *_ = load_run(tmp_path / "straight")
    m2, *_ = load_run(out)
    for (k, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p1, p2), k


def test_eight_workers_on_one_sqlite_study(tmp_path):
    config = SearchConfig(
        primitives="AFW", layers=4, trials=24, sampler="random", shape="tiny",
        proxy="synthetic", workers=8, seed=3,
    )  # fmt: skip
    run_search(config, tmp_path / "par", progress=False)
    trials = load_trials(tmp_path / "par")
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(done) == 24
    assert len({t["pattern"] for t in done}) == 24  # none trained twice
    assert len({t["number"] for t in trials}) == len(trials)
    assert not [t for t in trials if t["state"] in ("RUNNING", "WAITING")]


def test_an_append_after_a_torn_line_is_not_lost(tmp_path):
    """A kill mid-write leaves a fragment with no newline; the next record must start its own
    line (glued to the fragment, it would be skipped as damaged with it)."""
    log = tmp_path / "log.jsonl"
    append_jsonl(log, {"n": 1})
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"n": 2, "tor')
    append_jsonl(log, {"n": 3})
    append_jsonl(log, {"n": 4})
    assert [r["n"] for r in read_jsonl(log)] == [1, 3, 4]
    assert log.read_text().count("\n") == 4
    empty = tmp_path / "new.jsonl"
    append_jsonl(empty, {"n": 0})
    assert empty.read_text() == '{"n": 0}\n'


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, text_file, capsys):
    arch = Architecture.parse("AF", shape="tiny")
    cfg = _config(text_file)
    straight = train(arch, cfg, tmp_path / "straight", progress=False)
    out = tmp_path / "run"
    train(arch, cfg, out, progress=False, stop_at=3)
    # The last two checkpoints are kept.
    assert read_state(out / "checkpoint")["step"] == 3
    assert read_state(out / ".checkpoint.old")["step"] == 2
    model_file = out / "checkpoint" / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights: the sha256 check fails
    model_file.write_bytes(bytes(data))
    capsys.readouterr()

    # Reading the run (eval, export) uses the previous checkpoint and says so.
    _, _, _, info = load_run(out)
    assert info["step"] == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and "sha256" in err and "step 2" in err

    # Resuming does too, then sets the damaged one aside so the next save keeps the good one.
    resumed = train(arch, cfg, out, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "damaged" in err and "using the previous checkpoint" in err
    assert resumed.status == "completed" and resumed.step == straight.step
    assert (out / "checkpoint.damaged" / "model.safetensors").read_bytes() == bytes(data)
    assert read_state(out / "checkpoint")["step"] == straight.step
    assert read_state(out / ".checkpoint.old")["step"] == straight.step - 1
    # Steps 3.. were trained again from step 2: the run equals the uninterrupted one.
    losses = {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl")}
    assert losses == {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "straight/metrics.jsonl")}


def test_both_checkpoints_damaged_is_refused_with_the_latest_ones_reason(tmp_path, text_file):
    arch = Architecture.parse("AF", shape="tiny")
    cfg = _config(text_file)
    out = tmp_path / "run"
    train(arch, cfg, out, progress=False, stop_at=2)
    for folder in ("checkpoint", ".checkpoint.old"):
        (out / folder / "optimizer.safetensors").write_bytes(b"\x00" * 8)
    with pytest.raises(UserError, match=r"'[^']*/checkpoint' is damaged: optimizer.safetensors"):
        train(arch, cfg, out, resume=True, progress=False)
    assert not (out / "checkpoint.damaged").exists()


def _train_process(out, text_file) -> subprocess.Popen:
    """``hcomposer train`` in a process of its own, with far more steps than the test waits."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable, "-m", "hcomposer.cli", "train", "AF", "--shape", "tiny",
        "--data", str(text_file), "--tokens", "10M", "--batch-size", "2", "--seq-len", "16",
        "--eval-every", "0", "--checkpoint-every", "0", "--threads", "1",
        "--batch-threads", "1", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)


def test_a_second_process_on_a_run_folder_in_use_is_refused_naming_the_holder(
    tmp_path, text_file, capsys
):
    out = tmp_path / "run"
    holder = _train_process(out, text_file)
    try:
        deadline = time.time() + 120
        while not (out / "status.json").is_file():
            assert holder.poll() is None, holder.stderr.read()
            assert time.time() < deadline, "the first process never started training"
            time.sleep(0.2)
        assert read_json(out / HOLDER)["pid"] == holder.pid
        before = sorted(p.name for p in out.iterdir())
        for argv in (
            ["train", "AF", "--shape", "tiny", "--data", str(text_file), "--out", str(out),
             "--resume", "--tokens", "10M", "--batch-size", "2", "--seq-len", "16"],
            ["run", "--out", str(out)],
        ):  # fmt: skip
            capsys.readouterr()
            assert main(argv) == 2
            lines = capsys.readouterr().err.splitlines()
            assert len(lines) == 1 and "is in use by another hcomposer process" in lines[0]
            assert f"pid {holder.pid} on {socket.gethostname()}" in lines[0]
            assert "hcomposer train AF" in lines[0]
        # The refused processes changed nothing of the holder's.
        assert read_json(out / HOLDER)["pid"] == holder.pid
        assert sorted(p.name for p in out.iterdir()) == before
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # The lock died with its holder (SIGKILL: no cleanup ran); the folder can be taken again.
    assert read_json(out / HOLDER)["pid"] == holder.pid
    with FolderLock(out, argv=["test"]):
        assert read_json(out / HOLDER)["pid"] == os.getpid()
    assert not (out / HOLDER).exists()


def test_a_folder_created_for_the_lock_is_removed_when_the_command_is_refused(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    with pytest.raises(UserError), FolderLock(target):
        assert target.is_dir() and (target / HOLDER).is_file()
        raise UserError("bad input")
    assert list(tmp_path.iterdir()) == []
    with FolderLock(target):
        pass
    assert target.is_dir() and list(target.iterdir()) == []


def _search_argv(out) -> list[str]:
    return ["search", "--primitives", "AF", "--layers", "2", "--trials", "2", "--sampler",
            "random", "--proxy", "synthetic", "--shape", "tiny", "--out", str(out)]  # fmt: skip


@pytest.mark.parametrize("damage", ["not-a-database", "truncated"])
def test_a_study_db_that_is_not_a_database_is_one_line_naming_it(tmp_path, capsys, damage):
    out = tmp_path / "s"
    assert main([*_search_argv(out), "--no-progress"]) == 0
    study = out / "study.db"
    for extra in ("study.db-wal", "study.db-shm"):
        (out / extra).unlink(missing_ok=True)
    if damage == "truncated":
        study.write_bytes(study.read_bytes()[: study.stat().st_size // 3])
    else:
        study.write_bytes(b"these are not the bytes of a database\n" * 100)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(_search_argv(out)) == 2  # with the live view on
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and repr(str(study)) in lines[0]
    assert "restore it from a copy" in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_garbage_lines_in_metrics_are_skipped_and_counted_on_resume_and_in_compare(
    tmp_path, text_file, capsys
):
    arch = Architecture.parse("AF", shape="tiny")
    cfg = _config(text_file)
    out = tmp_path / "run"
    train(arch, cfg, out, progress=False, stop_at=3)
    metrics = out / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(b"".join([lines[0], b"garbage\n", b"\xff\xfe[\n", *lines[1:]]))
    capsys.readouterr()
    resumed = train(arch, cfg, out, resume=True, progress=False)
    err = capsys.readouterr().err
    assert resumed.status == "completed"
    assert f"skipped 2 lines of {str(metrics)!r}" in err and "(lines 2, 3;" in err
    assert [r["step"] for r in read_jsonl(metrics)] == list(range(1, resumed.step + 1))
    assert b"garbage" not in metrics.read_bytes()

    with open(metrics, "ab") as f:
        f.write(b'{"step": 99, "lo')  # a torn last line
    assert main(["compare", str(out), str(out), "--out", str(tmp_path / "cmp")]) == 0
    err = capsys.readouterr().err
    line = f"skipped 1 line of {str(metrics)!r} that is not a JSON record (line {resumed.step + 1};"
    assert err.count(line) == 2  # once per run compared


def test_an_error_leaves_no_progress_line_before_its_own(tmp_path, text_file, capsys, monkeypatch):
    from hcomposer.training.trainer import Trainer

    step = Trainer.step

    def fails_at_step_3(self, k):
        if k == 2:
            raise UserError("stopped on purpose at step 3")
        return step(self, k)

    monkeypatch.setattr(Trainer, "step", fails_at_step_3)
    argv = ["train", "AF", "--shape", "tiny", "--data", str(text_file), "--tokens", "1K",
            "--batch-size", "2", "--seq-len", "16", "--dtype", "fp32", "--eval-every", "0",
            "--out", str(tmp_path / "run")]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2  # the progress bar is on (not --no-progress)
    assert capsys.readouterr().err == "error: stopped on purpose at step 3\n"

    def fails(arch, proxy, seed):
        raise UserError("the proxy refused")

    config = SearchConfig(
        primitives="AF", layers=2, trials=2, sampler="random", shape="tiny", proxy="synthetic"
    )
    with pytest.raises(UserError, match="the proxy refused"):
        run_search(config, tmp_path / "s", objective=fails, progress=True)
    assert capsys.readouterr().err == ""


def test_a_database_that_stays_away_ends_the_wait_with_one_line(monkeypatch, capsys):
    import sqlalchemy.exc

    from hcomposer.search.reconnect import is_connection_error, retrying

    refused = sqlalchemy.exc.OperationalError("connect", {}, OSError("Connection refused"))
    calls = []

    def down_then_up():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise optuna.exceptions.StorageInternalError("commit failed") from refused
        return "done"

    assert not is_connection_error(optuna.exceptions.StorageInternalError("invalid data"))
    try:
        down_then_up()
    except optuna.exceptions.StorageInternalError as e:
        assert is_connection_error(e)
    calls.clear()
    monkeypatch.setenv("HCOMPOSER_DB_RETRY", "0.1,1")
    assert retrying(down_then_up) == "done" and len(calls) == 3
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "lost the connection" in err[0] and "retrying every 0.1 s" in err[0]
    assert "reconnected to the study's database" in err[1]

    def never_up():
        raise refused

    with pytest.raises(UserError, match=r"unreachable for more than 1 s .*run the same command"):
        retrying(never_up)
    # Other errors are not waited for.
    with pytest.raises(ValueError):
        retrying(lambda: int("x"))


def test_run_refuses_a_damaged_study_before_its_first_stage_line(tmp_path, capsys):
    from hcomposer.pipeline.state import State
    from hcomposer.recipes import get_recipe

    out = tmp_path / "p"
    State(out, get_recipe("quickstart"), ["hcomposer", "run"])
    (out / "search").mkdir()
    (out / "search" / "study.db").write_bytes(b"not a database" * 100)
    capsys.readouterr()
    assert main(["run", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "study.db' is not an SQLite database" in lines[0]
