"""Connections to PostgreSQL: psycopg_pool's pool, bounded in time everywhere, and the URL as shown.

A silent partition (packets dropped, nothing closed) must end a call, not hang it: connects are bounded by
``connect_timeout``, statements by the server's ``statement_timeout``, an idle connection to a vanished server is
found by TCP keepalives (and unacknowledged data by ``tcp_user_timeout``), and every transaction has a deadline:
a connection still held past it has its socket shut down, so the thread waiting on it gets an error at once
(the pool then drops that broken connection). No timeout here is configurable: the defaults fit a LAN and a WAN.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from watcher.store.ports import StoreUnavailable

CONNECT_SECONDS = 5  # libpq's connect_timeout (whole seconds)
STATEMENT_SECONDS = 20.0  # the server ends a statement that runs longer
CALL_SECONDS = 30.0  # the deadline of one transaction, waiting for a connection included (over any statement's)
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
USER_TIMEOUT_MS = 20_000  # unacknowledged data for this long ends the connection (Linux)
REAP_EVERY = 0.25


def redact(url: str) -> str:
    """A libpq URL or conninfo without its password, for logs, status and messages."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(an unreadable store url)"
    user = params.get("user", "")
    host = params.get("host", "localhost")
    port = params.get("port", "5432")
    return f"postgresql://{str(user) + '@' if user else ''}{host}:{port}/{params.get('dbname', '')}"


class StoreUnreachable(StoreUnavailable):
    """The database could not be reached at start (the message names it, never the password)."""


def connect_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the bounds every connection gets (the caller's own values win)."""
    bounds: dict[str, Any] = {"connect_timeout": CONNECT_SECONDS, **KEEPALIVES, "tcp_user_timeout": USER_TIMEOUT_MS}
    return {**bounds, **kwargs}


def _configure(conn: psycopg.Connection[Any]) -> None:
    """Each new connection: the server ends a statement past ``STATEMENT_SECONDS`` (set per session, not as a
    startup option, which PgBouncer refuses)."""
    conn.execute(f"SET statement_timeout = {int(STATEMENT_SECONDS * 1000)}")


class Pool:
    """At most ``size`` connections in use at once, idle ones reused, broken ones replaced; every use has a
    deadline past which its socket is shut down (see the module docstring)."""

    def __init__(self, url: str, kwargs: dict[str, Any], size: int) -> None:
        self._url = url
        self._kwargs = connect_kwargs(kwargs)
        self.call_seconds = CALL_SECONDS  # the deadline of one use (a test of a partition shortens it)
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            kwargs=self._kwargs,
            min_size=1,
            max_size=max(1, size),
            open=False,
            configure=_configure,
            timeout=CALL_SECONDS,
            reconnect_timeout=CALL_SECONDS,
            name="watcher-store",
        )
        self._held: dict[int, tuple[float, psycopg.Connection[Any]]] = {}  # id(conn) -> (deadline, conn)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    def check(self) -> None:
        """Connect once now, outside the pool (so a wrong URL or password is reported at start with libpq's own
        words), then open the pool."""
        with psycopg.connect(self._url, **self._kwargs) as conn:
            conn.execute("SELECT 1")
        self._pool.open(wait=False)
        self._reaper = threading.Thread(target=self._reap, name="store-deadlines", daemon=True)
        self._reaper.start()

    @contextmanager
    def connection(self, *, bounded: bool = True) -> Iterator[psycopg.Connection[Any]]:
        """A connection until the block ends, or for ``call_seconds`` (waiting for it included), when its socket is
        shut down under the statement that waits; ``bounded=False``: no deadline (migrations)."""
        deadline = time.monotonic() + self.call_seconds if bounded else None
        # waiting for a connection counts against the same deadline: a short outage is waited out, not failed
        with self._pool.connection(timeout=self.call_seconds) as conn:
            if deadline is not None:
                with self._lock:
                    self._held[id(conn)] = (deadline, conn)
            try:
                yield conn
            finally:
                with self._lock:
                    self._held.pop(id(conn), None)

    def _reap(self) -> None:
        """The deadlines' thread: shut down the socket of each connection held past its deadline."""
        while not self._stop.wait(REAP_EVERY):
            now = time.monotonic()
            with self._lock:
                late = [conn for deadline, conn in self._held.values() if deadline < now]
            for conn in late:
                _shut(conn)

    def drop_idle(self) -> None:
        """A partition or a server restart breaks the idle connections too: replace them all."""
        with contextlib.suppress(Exception):
            self._pool.drain()

    def close(self) -> None:
        """Close the pool: calls waiting for a connection fail at once (PoolClosed), and those on a connection
        have its socket shut down, so a close during an outage ends every call under way within about a second."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join()
        with self._lock:
            held = [conn for _, conn in self._held.values()]
        for conn in held:
            _shut(conn)
        with contextlib.suppress(Exception):
            self._pool.close(timeout=0.3)  # its workers may be in a connect to a server that is away


def _shut(conn: psycopg.Connection[Any]) -> None:
    """End the connection's TCP stream both ways: a thread blocked on it reads end-of-file and raises at once."""
    with contextlib.suppress(Exception):
        fd = conn.pgconn.socket
        with socket.socket(fileno=socket.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
