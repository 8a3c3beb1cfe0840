"""Riding out a database server that goes away for a while (a restart, a fail-over).

A search on PostgreSQL (or MySQL) talks to the server for every step of every trial. When
the server restarts, each statement in flight fails with a connection error, and so does
every new connection until the server accepts them again. Instead of dying, a worker waits
and tries the same storage call again:

- :class:`ReconnectingRDBStorage` is Optuna's ``RDBStorage`` whose every storage call
  (Optuna's own calls and the heartbeat thread's) is retried on a connection error, every
  ``interval`` seconds for up to ``limit`` seconds; the first failure prints one line on
  stderr (what failed, how long it will wait) and the first success after it another (how
  long it was down). Past the limit the search stops with a UserError saying how to resume.
- The study's claim lock (:mod:`hcomposer.search.claims`) is a session-level lock on its
  own connection: the server drops it with the session. The claim notices (releasing it
  fails) and decides again under a new lock, so no pattern is claimed twice.

A call whose commit reached the server just before the connection broke is sent again: a
trial created twice leaves a RUNNING trial with no owner, failed after two minutes
(:func:`hcomposer.search.storage.reap_dead_trials`); a trial's result told twice is refused
by Optuna (``UpdateFinishedTrialError``) and dropped. Neither trains a pattern twice: who
trains is decided by the claims.

``HCOMPOSER_DB_RETRY="INTERVAL,LIMIT"`` (seconds) overrides the defaults (2 s, 10 minutes).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import optuna
import sqlalchemy.exc

from hcomposer.errors import UserError
from hcomposer.search import optuna_compat as compat

__all__ = [
    "RETRY_INTERVAL",
    "RETRY_LIMIT",
    "ReconnectingRDBStorage",
    "is_connection_error",
    "retry_settings",
    "retrying",
    "outage",
]

RETRY_INTERVAL = 2.0
RETRY_LIMIT = 600.0

T = TypeVar("T")


def retry_settings() -> tuple[float, float]:
    """``(interval, limit)`` in seconds: the defaults or ``HCOMPOSER_DB_RETRY``."""
    try:
        interval, limit = (float(x) for x in os.environ.get("HCOMPOSER_DB_RETRY", "").split(","))
    except ValueError:
        return RETRY_INTERVAL, RETRY_LIMIT
    return max(0.1, interval), max(1.0, limit)


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is a lost or refused database
    connection: SQLAlchemy's ``OperationalError``/``InterfaceError``, or any DBAPI error that
    invalidated its connection. Optuna wraps them in ``StorageInternalError``."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _first_line(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(getattr(exc, "orig", None) or exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}"


class _Outage:
    """This process's view of the database: up, or down since when (one message each way,
    whichever thread sees it first)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: float | None = None

    def down(self, exc: BaseException, interval: float, limit: float) -> float:
        """Record a failure; returns when the outage began."""
        with self.lock:
            if self.since is None:
                self.since = time.monotonic()
                print(
                    f"hcomposer: lost the connection to the study's database ({_first_line(exc)});"
                    f" retrying every {interval:g} s for up to {limit:g} s",
                    file=sys.stderr,
                    flush=True,
                )
            return self.since

    def up(self) -> None:
        if self.since is None:
            return
        with self.lock:
            if self.since is not None:
                print(
                    f"hcomposer: reconnected to the study's database after "
                    f"{time.monotonic() - self.since:.0f} s; the search goes on",
                    file=sys.stderr,
                    flush=True,
                )
                self.since = None


outage = _Outage()
_depth = threading.local()


def retrying(call: Callable[[], T], *, what: str = "the study's database") -> T:
    """``call()``, retried while it fails with a connection error (see the module docstring).

    Nested calls (a storage method calling another) retry only at the outermost level."""
    if getattr(_depth, "n", 0):
        return call()
    interval, limit = retry_settings()
    while True:
        _depth.n = 1
        try:
            result = call()
        except Exception as e:
            if not is_connection_error(e):
                raise
            since = outage.down(e, interval, limit)
            if time.monotonic() - since > limit:
                raise UserError(
                    f"{what} was unreachable for more than {limit:g} s ({_first_line(e)}); "
                    "run the same command again to resume once it is back"
                ) from None
            time.sleep(interval)
            continue
        finally:
            _depth.n = 0
        outage.up()
        return result


def _reconnecting(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self, *args: Any, **kwargs: Any) -> Any:
        return retrying(lambda: method(self, *args, **kwargs))

    return call


def _not_a_lost_connection(record: logging.LogRecord) -> bool:
    """Optuna logs a lost connection in the middle of reading trials as a warning about
    query sizes, then fails: the retry's own message says what happened instead."""
    text = record.getMessage()
    return not (text.startswith("Caught an error from sqlalchemy") and "connection" in text)


logging.getLogger(compat.RDB_LOGGER).addFilter(_not_a_lost_connection)


class ReconnectingRDBStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` whose storage calls ride out a server restart (see the module docstring).

    Optuna still sees an ``RDBStorage`` (it wraps it in its cache and runs its heartbeat)."""


# Every public call that reads or writes the study, and the private ones Optuna's cache
# and the heartbeat call on the storage directly (``optuna_compat.BACKEND_CALLS``, checked by
# tests/test_optuna_compat.py); not the schema and version helpers (run once when the storage
# is opened).
_NOT_RETRIED = (
    "upgrade",
    "get_current_version",
    "get_head_version",
    "get_all_versions",
    "remove_session",
    "get_heartbeat_interval",
    "get_heartbeat_stale_trial_callback",
)
_CALLS = [
    name
    for name, value in vars(optuna.storages.RDBStorage).items()
    if callable(value) and not name.startswith("_") and name not in _NOT_RETRIED
] + list(compat.BACKEND_CALLS)
for _name in _CALLS:
    setattr(
        ReconnectingRDBStorage, _name, _reconnecting(getattr(optuna.storages.RDBStorage, _name))
    )
