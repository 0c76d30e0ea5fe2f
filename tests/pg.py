"""A throwaway PostgreSQL cluster for the tests: one per session, in a temp folder, on a free loopback port.

initdb refuses to run as root (CI runs as root), so the cluster is made and run as the ``postgres`` user there.
Each test gets its own database. When no server binaries are installed, the PostgreSQL tests are skipped and say
why (`.ci/run` installs Debian's ``postgresql`` package when it is missing).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _bindir() -> Path | None:
    """The newest installed server's binaries (Debian keeps them out of PATH), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A running throwaway cluster; :meth:`database` makes a new empty database and gives its URL."""

    def __init__(self, bindir: Path, *, durable: bool = False) -> None:
        """``durable``: fsync and synchronous commit on (a crash loses nothing acknowledged), for outage tests."""
        self.bindir = bindir
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="watcher-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._user: list[str] = []
        self._numbers = itertools.count(1)
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("PostgreSQL tests need an unprivileged 'postgres' user to run initdb as (running as root)")
            os.chmod(self.root, 0o700)  # the owner (postgres) only: the server wants its data private
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._user = ["runuser", "-u", "postgres", "--"]
            for parent in self.root.parents:  # every parent must be traversable by the server's user
                if not os.stat(parent).st_mode & 0o001:
                    pytest.skip(f"PostgreSQL tests need {parent} traversable by the 'postgres' user")

    def _run(self, *args: str) -> None:
        proc = subprocess.run([*self._user, *args], capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            log = self.data / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr or proc.stdout}\n{tail}")

    def start(self) -> Cluster:
        b = self.bindir
        self._run(str(b / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")  # fmt: skip
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                "listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\nfsync = off\n"
                "synchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n"
            )
            if self.durable:  # the last setting read wins
                conf.write("fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n")
        self._run(str(b / "pg_ctl"), "start", "-D", str(self.data), "-l", str(self.data / "server.log"), "-w",
                  "-t", "30", "-o", f"-p {self.port}")  # fmt: skip
        return self

    def halt(self) -> None:
        """Stop the server at once, as a crash would (``pg_ctl stop -m immediate``); :meth:`resume` starts it again."""
        self._run(str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", "immediate", "-w")

    def resume(self) -> None:
        """Start the halted server again on the same port (it recovers from its WAL first)."""
        self._run(str(self.bindir / "pg_ctl"), "start", "-D", str(self.data), "-l", str(self.data / "server.log"),
                  "-w", "-t", "60", "-o", f"-p {self.port}")  # fmt: skip

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", "immediate", "-w")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._numbers)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]  # a name we made
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def terminate(self, url: str, application_name: str | None = None) -> int:
        """Kill every backend connected to ``url``'s database (a partition, as the node sees it); how many."""
        import psycopg

        dbname = url.rsplit("/", 1)[1]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname=%s AND pid <> pg_backend_pid()"
                + (" AND application_name=%s" if application_name else ""),
                (dbname, application_name) if application_name else (dbname,),
            ).fetchall()
        return len(rows)


@contextmanager
def running(*, durable: bool = False) -> Iterator[Cluster]:
    """A cluster started for the block and stopped after it (the test skipped, saying why, when no PostgreSQL
    server is installed)."""
    bindir = _bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server installed (Debian: apt-get install postgresql; .ci/run does it)")
    cluster = Cluster(bindir, durable=durable).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """The session's throwaway cluster."""
    with running() as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> str:
    """A new empty database in the session's cluster."""
    return pg_cluster.database()
