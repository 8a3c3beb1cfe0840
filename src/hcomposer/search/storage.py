"""Study storage: where trials live, and how trials left by dead workers are found.

- default: ``sqlite:///<out>/study.db`` (the run folder holds the whole search);
- any SQLAlchemy URL (``postgresql://...``, ``mysql+pymysql://...``) for many machines;
- ``journal:PATH``: an Optuna journal file (``JournalFileBackend``), for shared file
  systems without a database.

A trial killed in flight stays RUNNING in the storage. Two detectors turn it back into
work: every running trial records its owner (host, pid, process start time), so a worker
on the same host sees at once that the owner is gone; for RDB storages a heartbeat also
catches owners on other machines (after ``grace_period`` seconds). The dead trial is
marked FAIL and its parameters are enqueued again (``retry_of`` = its number).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from hcomposer.errors import UserError
from hcomposer.guards import check_output_file
from hcomposer.runs import SearchDir
from hcomposer.search.optuna_compat import stale_trial_ids, storage_of, trial_id
from hcomposer.search.pg import driver_url, schema_lock
from hcomposer.search.reconnect import ReconnectingRDBStorage

__all__ = [
    "HEARTBEAT_INTERVAL",
    "GRACE_PERIOD",
    "storage_url",
    "check_storage",
    "check_sqlite_file",
    "open_storage",
    "owner_record",
    "owner_alive",
    "reap_dead_trials",
]

# A proxy trial trains for seconds to minutes; a minute of silence means the worker is gone.
# HCOMPOSER_HEARTBEAT="INTERVAL,GRACE" (seconds) overrides both, e.g. for a quick test.
HEARTBEAT_INTERVAL = 15
GRACE_PERIOD = 60
_SQLITE_HEADER = b"SQLite format 3\x00"


def _heartbeat() -> tuple[int, int]:
    spec = os.environ.get("HCOMPOSER_HEARTBEAT", "")
    try:
        interval, grace = (int(x) for x in spec.split(","))
    except ValueError:
        return HEARTBEAT_INTERVAL, GRACE_PERIOD
    return max(1, interval), max(2, grace)


def _host() -> str:
    """This worker's host as owner records name it; HCOMPOSER_HOST overrides the hostname
    (machines or containers that share one)."""
    return os.environ.get("HCOMPOSER_HOST") or socket.gethostname()


def storage_url(spec: str | None, out_dir: str | Path) -> str:
    """The storage a run uses; ``None`` is the SQLite file in the run folder."""
    if spec is None:
        return f"sqlite:///{SearchDir(out_dir).study_db.resolve()}"
    return spec


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:"):
        return None
    path = url.split(":///", 1)[1] if ":///" in url else ""
    return Path(path) if path and path != ":memory:" else None


def check_storage(spec: str | None, out_dir: str | Path, *, must_exist: bool = False) -> None:
    """Raise UserError if the storage cannot be reached; writes nothing.

    SQLite and journal paths need an existing, writable folder (the run folder itself is
    created later); with ``must_exist`` (reading a finished search) the file itself.
    Other URLs are connected to once.
    """
    if spec is None:
        check_sqlite_file(SearchDir(out_dir).study_db, f"search folder {str(out_dir)!r}:")
        return
    if spec.startswith("journal:"):
        path = Path(spec[len("journal:") :])
        if not str(path) or not path.parent.is_dir():
            folder = str(path.parent)
            raise UserError(f"--storage {spec!r}: the journal's folder {folder!r} does not exist")
        check_output_file(path, f"--storage {spec!r}:")
        if must_exist and not path.is_file():
            raise UserError(f"--storage {spec!r}: the journal file does not exist")
        return
    if "://" not in spec:
        raise UserError(
            f"--storage {spec!r}: give an SQLAlchemy URL (sqlite:///PATH, postgresql://...) "
            "or journal:PATH"
        )
    sqlite = _sqlite_path(spec)
    if spec.startswith("sqlite:"):
        if sqlite is None or not sqlite.parent.is_dir():
            raise UserError(f"--storage {spec!r}: the folder of the SQLite file does not exist")
        check_output_file(sqlite, f"--storage {spec!r}:")
        if must_exist and not sqlite.is_file():
            raise UserError(f"--storage {spec!r}: the SQLite file does not exist")
        check_sqlite_file(sqlite, f"--storage {spec!r}:")
        return
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(driver_url(spec))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # any driver or network failure is the user's URL to fix
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--storage {spec!r} is unreachable: {reason[:200]}") from None


def check_sqlite_file(path: Path, where: str) -> None:
    """Raise UserError when ``path`` exists but is not a whole SQLite database; writes nothing.

    The file is opened ``immutable`` (no lock, no journal, no -wal/-shm files created) for
    SQLite's ``quick_check``, which reads every page: a file truncated or overwritten in
    the middle is found here, not as a traceback in the middle of a search.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return  # absent or empty: SQLite creates the tables
    fix = "restore it from a copy, or start the search again with a new --out"
    with open(path, "rb") as f:
        if f.read(16) != _SQLITE_HEADER:
            raise UserError(f"{where} {str(path)!r} is not an SQLite database; {fix}")
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True)
        try:
            verdict = con.execute("PRAGMA quick_check").fetchall()
        finally:
            con.close()
    except sqlite3.Error as e:
        verdict = [(str(e),)]
    if verdict != [("ok",)]:
        raise UserError(f"{where} {str(path)!r} is damaged ({verdict[0][0][:120]}); {fix}")


def open_storage(url: str, *, reader: bool = False) -> BaseStorage:
    """An Optuna storage for a resolved URL (see :func:`storage_url`).

    ``reader=True`` never creates tables, so reading a search that is still starting
    cannot race its own creation of the database.
    """
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url[len("journal:") :]))
    url = driver_url(url)
    kwargs: dict[str, Any] = {}
    sqlite = _sqlite_path(url)
    if sqlite is not None:
        # Several local workers write one SQLite file: wait for the lock, do not fail.
        kwargs["connect_args"] = {"timeout": 120}
        if not reader:
            _use_wal(sqlite)
    else:
        # A server that restarted leaves dead connections in the pool: test each on checkout.
        kwargs["pool_pre_ping"] = True
    # A database server may restart under a long search: its calls wait for it (not SQLite's).
    kind = optuna.storages.RDBStorage if sqlite is not None else ReconnectingRDBStorage
    with warnings.catch_warnings(), schema_lock(url, skip=reader):
        # The heartbeat is marked experimental; it is what finds workers lost on other hosts.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = kind(
            url,
            engine_kwargs=kwargs,
            heartbeat_interval=_heartbeat()[0],
            grace_period=_heartbeat()[1],
            skip_table_creation=reader,
        )
    if sqlite is not None:
        _sync_normal(storage)
    return storage


def _use_wal(path: Path) -> None:
    """Write-ahead logging: readers do not block the writer, one fsync per commit.

    The mode is stored in the file, so it is set once, before Optuna opens it.
    """
    con = sqlite3.connect(path, timeout=120)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def _sync_normal(storage) -> None:
    """``synchronous=NORMAL`` on every connection: in WAL mode a commit survives a killed
    process (it is in the OS cache), only a power cut can lose the last commits."""
    import sqlalchemy

    def on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    sqlalchemy.event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened before the listener are replaced


def _process_start(pid: int) -> float | None:
    """When a process started (tells a reused pid apart), or None if there is none."""
    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def owner_record() -> dict[str, Any]:
    """Who runs a trial: stored as the trial's ``owner`` user attribute."""
    pid = os.getpid()
    return {"host": _host(), "pid": pid, "start": _process_start(pid)}


def owner_alive(owner: dict[str, Any] | None) -> bool | None:
    """True/False for an owner on this host, None when this host cannot tell."""
    if not owner or owner.get("host") != _host():
        return None
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        start, status = round(proc.create_time(), 2), proc.status()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists; another user's
    # Records written before psutil kept the kernel's clock ticks as text: not comparable.
    recorded = owner.get("start")
    if isinstance(recorded, float) and abs(start - recorded) > 0.05:
        return False  # the pid was reused by another process
    # A zombie (killed, not yet reaped by its parent) is dead too.
    return status not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def _fail_and_retry(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    storage = storage_of(study)
    try:
        changed = storage.set_trial_state_values(trial_id(trial), state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another worker got there first
    if not changed:
        return False
    if not trial.params:
        return True  # died before its parameters were drawn: nothing to run again
    study.enqueue_trial(
        dict(trial.params),
        user_attrs={"retry_of": trial.number, "retry_reason": reason},
    )
    return True


def reap_dead_trials(study: optuna.Study, *, unowned_after: float = 120.0) -> list[int]:
    """Fail the RUNNING trials whose worker is gone and enqueue them again.

    Returns the numbers of the trials it failed. A RUNNING trial without an owner (the
    worker died between creating it and recording itself) counts as dead after
    ``unowned_after`` seconds.
    """
    reaped = []
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("owner")
        alive = owner_alive(owner)
        start = t.datetime_start
        if owner is None and start is not None and now - start.timestamp() > unowned_after:
            alive = False
        if alive is False:
            where = f"pid {owner['pid']}" if owner else "an unknown worker"
            if _fail_and_retry(study, t, f"worker died in flight ({where})"):
                reaped.append(t.number)
    # Owners on other machines: the heartbeat (RDB storages only).
    for stale in stale_trial_ids(study):
        t = storage_of(study).get_trial(stale)
        lost = t.state == TrialState.RUNNING
        if lost and _fail_and_retry(study, t, "worker lost (no heartbeat)"):
            reaped.append(t.number)
    return reaped
