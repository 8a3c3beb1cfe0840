"""Searches on a real PostgreSQL server: a throwaway cluster started by this module.

- two ``hcomposer search`` processes with two workers each on one study train exactly
  ``--trials`` trials, each pattern once, and both create the schema without a race;
- a worker on "another host" (``HCOMPOSER_HOST``) SIGKILLed mid-trial: its trial is found
  by the heartbeat in the other process, failed, and run again;
- both processes SIGKILLed: the same command resumes and ends with exactly ``--trials``;
- the server restarted (every session cut) in the middle of a two-process search: the
  workers say so, wait, go on, and every pattern is trained exactly once;
- a claim whose lock's session the server ended is withdrawn and decided again.

Skipped, with one line, only where no PostgreSQL server binaries are installed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from hcomposer.search import load_trials
from pgcluster import PgCluster, find_bin

pytestmark = pytest.mark.postgres

TRIALS = 6


@pytest.fixture(scope="session")
def pg():
    bindir = find_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    cluster = PgCluster(bindir).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _search(url, out, workers, delay, **env):
    # The proxy (with its delay) is part of the search's identity: keep it equal to share
    # one study.
    cmd = [
        sys.executable,
        "-m",
        "hcomposer.cli",
        "search",
        "--proxy",
        f"synthetic:{delay}",
        "--primitives",
        "AF",
        "--layers",
        "4",
        "--trials",
        str(TRIALS),
        "--sampler",
        "tpe",
        "--n-startup",
        "3",
        "--shape",
        "tiny",
        "--workers",
        str(workers),
        "--storage",
        url,
        "--out",
        str(out),
        "--no-progress",
    ]
    full_env = {**os.environ, **env}
    return subprocess.Popen(
        cmd, stderr=subprocess.PIPE, text=True, env=full_env, start_new_session=True
    )


def _read(out, url):
    try:
        return load_trials(out, storage=url)
    except Exception:  # the folder or the study is still being created
        return []


def _wait(procs, timeout=300):
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        errs.append(err)
    return [p.returncode for p in procs], errs


def _check_exact(trials):
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(done) == TRIALS
    assert len({t["pattern"] for t in done}) == TRIALS  # nothing trained twice
    assert not [t for t in trials if t["state"] in ("RUNNING", "WAITING")]
    return done


def test_two_processes_two_workers_each(pg, tmp_path):
    url = pg.create_db(f"s{uuid.uuid4().hex[:8]}")
    procs = [_search(url, tmp_path / f"p{i}", 2, 0.5) for i in range(2)]
    codes, errs = _wait(procs)
    assert codes == [0, 0], errs
    done = _check_exact(load_trials(tmp_path / "p0", storage=url))
    # The folders name their storage; it is read only when given (one study for both).
    assert load_trials(tmp_path / "p1", storage=url) == load_trials(tmp_path / "p0", storage=url)
    assert len({t["owner"]["pid"] for t in done}) >= 2


def test_worker_killed_mid_trial_is_recovered_by_heartbeat(pg, tmp_path):
    url = pg.create_db(f"s{uuid.uuid4().hex[:8]}")
    # A 1 s heartbeat with 8 s of grace; each process claims its own host, so the other
    # one cannot see the dead pid and only the heartbeat can tell.
    beat = "1,8"
    a = _search(url, tmp_path / "a", 1, 4.0, HCOMPOSER_HOST="host-a", HCOMPOSER_HEARTBEAT=beat)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            mine = [
                t
                for t in _read(tmp_path / "a", url)
                if t["state"] == "RUNNING" and (t["owner"] or {}).get("pid") == a.pid
            ]
            if mine and mine[0]["pattern"]:
                break
            assert a.poll() is None, a.stderr.read()
            time.sleep(0.2)
        else:
            raise AssertionError("process a never started a trial")
        os.killpg(a.pid, signal.SIGKILL)
        a.wait(timeout=30)
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
    trials_a = load_trials(tmp_path / "a", storage=url)
    killed = next(t for t in trials_a if t["number"] == mine[0]["number"])
    assert killed["state"] == "RUNNING"
    b = _search(url, tmp_path / "b", 2, 4.0, HCOMPOSER_HOST="host-b", HCOMPOSER_HEARTBEAT=beat)
    codes, errs = _wait([b])
    assert codes == [0], errs
    trials = load_trials(tmp_path / "b", storage=url)
    _check_exact(trials)
    dead = next(t for t in trials if t["number"] == mine[0]["number"])
    assert dead["state"] == "FAIL" and "no heartbeat" in dead["failure"]
    retry = [t for t in trials if t["retry_of"] == dead["number"]]
    assert len(retry) == 1 and retry[0]["pattern"] == dead["pattern"]
    assert retry[0]["state"] in ("COMPLETE", "CACHED")
    assert retry[0]["owner"]["host"] == "host-b"


def _until_trials_run(procs, folder, url) -> None:
    """Wait until the search has a completed trial and one in flight (the processes alive)."""
    deadline = time.time() + 180
    while time.time() < deadline:
        trials = _read(folder, url)
        done = [t for t in trials if t["state"] == "COMPLETE"]
        running = [t for t in trials if t["state"] == "RUNNING" and t["pattern"]]
        if done and running:
            return
        assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
        time.sleep(0.2)
    raise AssertionError("the search never got going")


def test_resume_after_both_processes_die(pg, tmp_path):
    url = pg.create_db(f"s{uuid.uuid4().hex[:8]}")
    procs = [_search(url, tmp_path / f"p{i}", 2, 5.0) for i in range(2)]
    try:
        _until_trials_run(procs, tmp_path / "p0", url)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    before = load_trials(tmp_path / "p0", storage=url)
    killed = [t for t in before if t["state"] == "RUNNING"]
    assert killed
    kept = {t["number"]: t for t in before if t["state"] == "COMPLETE"}
    assert len(kept) < TRIALS

    codes, errs = _wait([_search(url, tmp_path / "p0", 2, 5.0)])
    assert codes == [0], errs
    after = load_trials(tmp_path / "p0", storage=url)
    _check_exact(after)
    for n, t in kept.items():  # completed trials are untouched
        assert after[n]["state"] == "COMPLETE" and after[n]["finished"] == t["finished"]
    for k in killed:
        assert after[k["number"]]["state"] == "FAIL"


def test_server_restarted_mid_search_workers_wait_and_finish(pg, tmp_path):
    url = pg.create_db(f"s{uuid.uuid4().hex[:8]}")
    procs = [_search(url, tmp_path / f"p{i}", 2, 2.0) for i in range(2)]
    try:
        _until_trials_run(procs, tmp_path / "p0", url)
        pg.restart(down=4.0)
        codes, errs = _wait(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert codes == [0, 0], errs
    said = "".join(errs)
    assert "lost the connection to the study's database" in said, errs
    assert "reconnected to the study's database after" in said, errs
    assert "Traceback" not in said, errs
    trials = load_trials(tmp_path / "p0", storage=url)
    done = _check_exact(trials)
    # Trained exactly once: one evaluation per pattern, none lost to a missed heartbeat.
    evaluated = [t for t in trials if t["architecture"] is not None]
    assert sorted(t["pattern"] for t in evaluated) == sorted(t["pattern"] for t in done)
    assert not [t for t in trials if "no heartbeat" in (t["failure"] or "")]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_claim_whose_lock_broke_is_withdrawn_and_decided_again(pg, monkeypatch):
    import optuna
    import sqlalchemy

    from hcomposer.search import claims
    from hcomposer.search.storage import open_storage

    url = pg.create_db(f"s{uuid.uuid4().hex[:8]}")
    study = optuna.create_study(storage=open_storage(url), study_name="s")
    trial = study.ask()
    roles = []
    real = claims.decide

    def decide_then_cut(trials, number, *args, **kwargs):
        roles.append(study.trials[number].user_attrs.get("role"))
        verdict = real(trials, number, *args, **kwargs)
        if len(roles) == 1:
            # The server ends the lock's session (as a restart does) while the claim holds it.
            engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
            with engine.connect() as con:
                cut = con.execute(
                    sqlalchemy.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_locks "
                        "WHERE locktype = 'advisory' AND granted"
                    )
                ).fetchall()
            engine.dispose()
            assert cut == [(True,)]
        return verdict

    monkeypatch.setattr(claims, "decide", decide_then_cut)
    verdict, _ = claims.claim(study, trial, "AF", 4)
    # Decided twice: the claim written under the broken lock was withdrawn first.
    assert verdict == "train" and roles == [None, "unclaimed"]
    assert study.trials[trial.number].user_attrs["role"] == "evaluation"
