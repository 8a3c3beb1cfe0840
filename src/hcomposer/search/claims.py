"""Exactly-once training across workers, processes and machines that share one study.

Before a trial trains its pattern it *claims* it: under a lock that every worker of the
study takes (one per study, held for a read and one write), it reads the log and

- answers from the log when the pattern is already trained (``cached``), or was trained
  and stopped by the pruner (``pruned``: told PRUNED again, never re-run),
- waits when another worker holds a live claim on the pattern (``wait``),
- refuses when the pattern failed before and this trial is not a retry (``failed``),
- refuses when the trained (scored or pruned) plus claimed-and-running trials fill the
  budget (``surplus``),
- otherwise writes ``role = "evaluation"`` on the trial (``train``).

The claim is the ``role`` user attribute, committed before the lock is released, so the
next worker's read sees it. A claim dies with its trial: a dead worker's trial is failed
by :func:`hcomposer.search.storage.reap_dead_trials` and its slot is free again.

The lock lives where the study lives: a PostgreSQL advisory lock (``pg_advisory_lock``,
keyed by the study id, on its own connection), MySQL's ``GET_LOCK``, or an ``flock`` on a
file next to a SQLite database or a journal file.

A database server that restarts drops the session's lock with it. Taking the lock then
waits for the server (:mod:`hcomposer.search.reconnect`), and a claim whose lock broke
while it was held (its release fails) is withdrawn and decided again under a new lock: a
worker that took the lock meanwhile may not have seen it.

Trial numbers alone do not give this: an enqueued retry keeps the number it got when it
was enqueued and may start after higher-numbered trials have decided, so ordering by
number let a retry and a fresh trial train the same pattern past the budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from hcomposer.search import optuna_compat as compat
from hcomposer.search.reconnect import is_connection_error, retrying

__all__ = ["study_lock", "decide", "claim"]

_LOCK_NAMESPACE = 0x6863  # "hc": keeps our advisory keys apart from other applications'


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _sql_lock(engine: Any, study_id: int) -> Iterator[None]:
    dialect = engine.dialect.name
    if dialect == "postgresql":
        take = "SELECT pg_advisory_lock(:ns, :id)"
        give = "SELECT pg_advisory_unlock(:ns, :id)"
        args: dict[str, Any] = {"ns": _LOCK_NAMESPACE, "id": study_id}
    elif dialect in ("mysql", "mariadb"):
        take = "SELECT GET_LOCK(:name, -1)"
        give = "SELECT RELEASE_LOCK(:name)"
        args = {"name": f"hcomposer-study-{study_id}"}
    else:
        raise NotImplementedError(dialect)
    with engine.connect() as con:
        con.execute(sqlalchemy.text(take), args)
        con.commit()
        failed = True
        try:
            yield
            failed = False
        finally:
            try:
                con.execute(sqlalchemy.text(give), args)
                con.commit()
            except Exception as e:
                # The block's own error, if any, is the one to raise.
                if not failed and is_connection_error(e):
                    raise LockLost("the study lock's connection broke while it was held") from e
                if not failed:
                    raise


@contextlib.contextmanager
def study_lock(study: optuna.Study) -> Iterator[None]:
    """Hold the study's claim lock (see the module docstring) for the ``with`` block."""
    backend = compat.storage_backend(study)
    engine = getattr(backend, "engine", None)
    if engine is not None and engine.dialect.name == "sqlite":
        database = engine.url.database
        if database and database != ":memory:":
            with _flock(Path(f"{database}.claims.lock")):
                yield
            return
    elif engine is not None:
        with _sql_lock(engine, compat.study_id(study)):
            yield
        return
    # The journal's file sits under the JournalStorage itself (not under the backend above).
    journal = compat.journal_file(compat.storage_of(study))
    if journal:
        with _flock(Path(f"{journal}.claims.lock")):
            yield
        return
    yield  # an in-memory storage: one process, nothing to share


class LockLost(Exception):
    """The claim lock's session ended while it was held (the database server restarted)."""


def _raise_if_down(study: optuna.Study, first: Exception) -> None:
    """Raise ``first`` again while the study's database still refuses connections (for
    :func:`retrying`, which then waits and calls again)."""
    engine = getattr(compat.storage_backend(study), "engine", None)
    if engine is None:
        raise first
    with engine.connect() as con:
        con.execute(sqlalchemy.text("SELECT 1"))


def _retried(trials: list[FrozenTrial], number: int) -> bool:
    return any(t.user_attrs.get("retry_of") == number for t in trials)


def decide(
    trials: list[FrozenTrial], number: int, pattern: str, budget: int, *, is_retry: bool
) -> tuple[str, FrozenTrial | None]:
    """What trial ``number`` may do with ``pattern``, given the log (see the docstring)."""
    claimed = 0
    running = failed = None
    for t in trials:
        if t.number == number or t.user_attrs.get("role") != "evaluation":
            continue
        # A pruned trial trained part-way: it spent a slot of the budget like a scored one.
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
            claimed += 1
        if t.user_attrs.get("pattern") != pattern:
            continue
        if t.state == TrialState.COMPLETE:
            return "cached", t
        if t.state == TrialState.PRUNED:
            return "pruned", t
        if t.state == TrialState.RUNNING:
            running = t
        elif t.state == TrialState.FAIL and t.user_attrs.get("failure") and failed is None:
            # A trial killed in flight is run again; only real failures count.
            failed = None if _retried(trials, t.number) else t
    if running is not None:
        return "wait", running
    if failed is not None and not is_retry:
        return "failed", failed
    if claimed >= budget:
        return "surplus", None
    return "train", None


def claim(
    study: optuna.Study,
    trial: optuna.Trial,
    pattern: str,
    budget: int,
    *,
    poll: float = 0.5,
    on_wait: Any = None,
) -> tuple[str, FrozenTrial | None]:
    """Claim ``pattern`` for ``trial``; waits while another worker trains it.

    Returns ``("train", None)`` with the claim written, or ``("cached" | "pruned" |
    "failed" | "surplus", earlier trial or None)``. ``on_wait()`` runs between polls (the caller
    reaps dead trials there, so a claim held by a dead worker is released).
    """
    is_retry = "retry_of" in trial.user_attrs
    while True:
        verdict = None
        try:
            with study_lock(study):
                trials = study.get_trials(deepcopy=False)
                verdict, known = decide(trials, trial.number, pattern, budget, is_retry=is_retry)
                if verdict == "train":
                    trial.set_user_attr("role", "evaluation")
        except Exception as e:
            if not isinstance(e, LockLost) and not is_connection_error(e):
                raise
            # The server went away: wait for it (or give up, past the limit), withdraw a claim
            # written under the lost lock, and decide again.
            retrying(lambda first=e: _raise_if_down(study, first))
            if verdict == "train":
                trial.set_user_attr("role", "unclaimed")
            continue
        if verdict != "wait":
            return verdict, known
        if on_wait is not None:
            on_wait()
        time.sleep(poll)
