"""Crash safety and parallel workers, with real processes.

- A search killed with SIGKILL in the middle of a trial resumes when the same command is
  run again: completed trials are kept, the killed trial is run again, and the study ends
  with exactly the requested number of trained trials.
- Two worker processes on one SQLite study train exactly the requested number of
  trials, each pattern once.
- The claim lock of a SQLite or journal study is an flock beside its file.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend

from hcomposer.search import SearchConfig, load_trials, run_search
from hcomposer.search.claims import study_lock


def _cli(out, trials, delay):
    return [
        sys.executable,
        "-m",
        "hcomposer.cli",
        "search",
        "--proxy",
        f"synthetic:{delay}",
        "--primitives",
        "AFW",
        "--layers",
        "4",
        "--trials",
        str(trials),
        "--sampler",
        "tpe",
        "--n-startup",
        "3",
        "--shape",
        "tiny",
        "--out",
        str(out),
        "--no-progress",
    ]


def _read(out):
    try:
        return load_trials(out)
    except Exception:  # the folder or the database is still being created
        return []


def test_resume_after_sigkill_during_a_trial(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(out, 5, 1.0), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            trials = _read(out)
            done = [t for t in trials if t["state"] == "COMPLETE"]
            running = [t for t in trials if t["state"] == "RUNNING" and t["pattern"]]
            if len(done) >= 2 and running:
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        else:
            raise AssertionError("the search never reached its third trial")
        time.sleep(0.3)  # well inside the 1 s trial
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {t["number"]: t for t in _read(out)}
    killed = [t for t in before.values() if t["state"] == "RUNNING"]
    assert len(killed) == 1
    kept = {n: t for n, t in before.items() if t["state"] == "COMPLETE"}

    rerun = subprocess.run(_cli(out, 5, 1.0), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr

    after = load_trials(out)
    done = [t for t in after if t["state"] == "COMPLETE"]
    assert len(done) == 5
    assert len({t["pattern"] for t in done}) == 5  # nothing trained twice
    numbers = [t["number"] for t in after]
    assert len(numbers) == len(set(numbers))
    for n, t in kept.items():  # completed trials are untouched
        assert after[n]["state"] == "COMPLETE" and after[n]["finished"] == t["finished"]
    dead = after[killed[0]["number"]]
    assert dead["state"] == "FAIL" and "worker died" in dead["failure"]
    retry = [t for t in after if t["retry_of"] == dead["number"]]
    assert len(retry) == 1 and retry[0]["pattern"] == dead["pattern"]
    assert retry[0]["state"] == "COMPLETE"


def test_two_workers_share_one_sqlite_study(tmp_path):
    config = SearchConfig(
        primitives="AFW",
        layers=4,
        trials=10,
        sampler="tpe",
        n_startup=3,
        shape="tiny",
        proxy="synthetic:0.4",
        workers=2,
    )
    result = run_search(config, tmp_path / "par", progress=False)
    trials = load_trials(tmp_path / "par")
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(done) == 10
    assert len({t["pattern"] for t in done}) == 10
    assert len({t["owner"]["pid"] for t in done}) == 2  # both workers trained trials
    assert not [t for t in trials if t["state"] in ("RUNNING", "WAITING")]
    assert result.best["score"] == max(t["score"] for t in done)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_claim_lock_of_a_file_study_is_held_beside_the_file(kind, tmp_path):
    # Workers of a SQLite or journal study claim under an flock on FILE.claims.lock: while one
    # holds it, another open of that file cannot take it.
    path = tmp_path / ("db.sqlite" if kind == "sqlite" else "journal.log")
    storage = (
        f"sqlite:///{path}"
        if kind == "sqlite"
        else optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    )
    study = optuna.create_study(storage=storage)
    lock = tmp_path / f"{path.name}.claims.lock"
    with study_lock(study), open(lock, "a+b") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
