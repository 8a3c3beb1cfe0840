"""A throwaway PostgreSQL cluster for tests: ``initdb`` + ``pg_ctl`` on a free loopback port.

The server binaries are looked up in ``$PG_BIN``, then Debian's
``/usr/lib/postgresql/<version>/bin`` (newest first), then ``PATH``. ``initdb`` refuses to
run as root, so as root the cluster belongs to the ``postgres`` system user (``runuser``).
The cluster trusts local connections, keeps no data on exit and runs with ``fsync=off``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["find_bin", "PgCluster"]


def find_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``, or None."""
    candidates = []
    if os.environ.get("PG_BIN"):
        candidates.append(os.environ["PG_BIN"])
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0)
    candidates.extend(reversed(versions))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).parent))
    for c in candidates:
        if (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runuser() -> str:
    """``runuser`` from PATH, or from /usr/sbin or /sbin where a PATH without them (a bare
    ``env -i`` shell) leaves it out."""
    found = shutil.which("runuser") or next(
        (c for c in ("/usr/sbin/runuser", "/sbin/runuser") if Path(c).is_file()), None
    )
    if found is None:
        raise RuntimeError("running as root needs runuser (util-linux) to start PostgreSQL")
    return found


class PgCluster:
    """``start()`` a cluster, ``url(db)`` for SQLAlchemy, ``create_db(name)``, ``restart()``,
    ``stop()``."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="hcomposer-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._user = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._user is not None:
            cmd = [_runuser(), "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.dir)

    def _check(self, proc: subprocess.CompletedProcess, what: str) -> None:
        if proc.returncode != 0:
            log = self.log.read_text() if self.log.is_file() else ""
            raise RuntimeError(f"{what} failed: {proc.stdout}{proc.stderr}{log[-2000:]}")

    def start(self) -> PgCluster:
        init = self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        self._check(init, "initdb")
        return self._serve()

    def _serve(self) -> PgCluster:
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        up = self._run(
            "pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.log), "-w", "start"
        )
        self._check(up, "pg_ctl start")
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        return self

    def restart(self, down: float = 3.0) -> None:
        """Stop the server (``-m fast``: every session is cut, statements in flight fail),
        stay down ``down`` seconds, and start it again on the same port and data.

        Not ``-m immediate``: with ``synchronous_commit=off`` a crash loses the commits of
        the last moments, which a client was already told had succeeded."""
        self._check(
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"),
            "pg_ctl stop",
        )
        time.sleep(down)
        self._serve()

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        """A fresh, empty database; returns its URL."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as con:
            con.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
