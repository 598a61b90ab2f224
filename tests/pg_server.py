"""A real, throwaway PostgreSQL server for the store tests (no mocks).

Debian's `postgresql` package (scripts/bootstrap.sh installs it) provides initdb and
pg_ctl under /usr/lib/postgresql/<major>/bin. The server runs from a temporary
directory, as an unprivileged user (initdb refuses root: as root we run it as `nobody`
via runuser), listening only on a Unix socket in that directory (no TCP port, so
nothing else on the machine can reach it and no port can clash), with trust
authentication for that socket alone. It is stopped (pg_ctl stop -m fast) and the
directory removed at the end of the test session.

Missing binaries: a failure under CI=true (the set-up must install them), a skip
elsewhere.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SUPERUSER = "otacoap"


def find_pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory holding initdb and pg_ctl."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
    )
    for d in reversed(candidates):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    return None


def require_pg_bin() -> Path:
    bindir = find_pg_bin()
    if bindir is not None:
        return bindir
    msg = (
        "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin; "
        "run scripts/bootstrap.sh as root (it installs Debian's postgresql package)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


class PgServer:
    """One running cluster; `new_database()` hands each caller a fresh, empty database."""

    def __init__(self, bindir: Path, root: Path, user: str | None) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.sockdir = root  # the socket lives beside the data directory
        self._user = user
        self._count = 0

    def _run(self, *argv: str, timeout: float = 120.0) -> None:
        cmd = list(argv)
        if self._user is not None:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        self.launch()

    def launch(self) -> None:
        """pg_ctl start on the existing cluster (again, after `stop`: same socket)."""
        opts = (
            f"-c listen_addresses='' -c unix_socket_directories='{self.sockdir}' "
            "-c fsync=off -c full_page_writes=off -c max_connections=50 "
            "-c shared_buffers=16MB"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            "120",
            "start",
        )

    def stop(self, mode: str = "fast", *, check: bool = False) -> None:
        """pg_ctl stop -m `mode` (fast: sessions terminated; immediate: no checkpoint,
        like a crash). `check`: raise if it fails (the teardown does not)."""
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        except Exception:
            if check:
                raise

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@/{dbname}?host={self.sockdir}"

    def new_database(self) -> str:
        """A fresh, empty database's URL (each test gets its own)."""
        import psycopg

        self._count += 1
        name = f"t{os.getpid()}_{self._count}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def running_server() -> Iterator[PgServer]:
    bindir = require_pg_bin()
    user: str | None = None
    root = Path(tempfile.mkdtemp(prefix="otacoap-pg-"))
    if os.geteuid() == 0:
        user = "nobody"
        ent = pwd.getpwnam(user)
        os.chown(root, ent.pw_uid, ent.pw_gid)
    root.chmod(0o755)  # the client (this process) reaches the socket inside
    server = PgServer(bindir, root, user)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
