"""What a study on PostgreSQL needs beyond Optuna's RDB storage.

Optuna creates its schema (tables, enum types, the ``alembic_version`` row) without a
lock: two processes that open a fresh database at once both try, and the second dies
with ``UniqueViolation``. :func:`schema_lock` serialises storage creation with a
PostgreSQL advisory lock, held on its own connection while Optuna creates (or finds)
the schema; other databases need nothing (SQLite serialises writers itself).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["is_postgres", "driver_url", "schema_lock", "SCHEMA_LOCK_KEY"]

# Any 64-bit constant works; every hcomposer process must use the same one.
SCHEMA_LOCK_KEY = 0x68636F6D_706F7372  # "hcomposr"


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql:", "postgresql+", "postgres:"))


def driver_url(url: str) -> str:
    """``postgresql://`` means psycopg2 to SQLAlchemy; with only psycopg 3 installed (the
    ``hcomposer[postgres]`` extra) use that driver instead of failing on the import."""
    import importlib.util

    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            rest = url[len(prefix) :]
            if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg"):
                return "postgresql+psycopg://" + rest
            return "postgresql://" + rest
    return url


@contextlib.contextmanager
def schema_lock(url: str, *, skip: bool = False) -> Iterator[None]:
    """Hold the database's schema lock (PostgreSQL only) for the ``with`` block."""
    if skip or not is_postgres(url):
        yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as con:
            # A session-level lock, so it outlives the statement's own transaction; the
            # schema is committed by Optuna's connection before we let go.
            con.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
            con.commit()
            try:
                yield
            finally:
                con.execute(
                    sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": SCHEMA_LOCK_KEY}
                )
                con.commit()
    finally:
        engine.dispose()
