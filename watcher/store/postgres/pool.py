"""Connections to PostgreSQL: a small pool that replaces a broken connection at once, and the URL as shown."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg


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


class StoreUnreachable(ConnectionError):
    """The database could not be reached at start (the message names it, never the password)."""


class Pool:
    """A small pool of psycopg connections: at most ``size`` in use at once, idle ones reused, broken ones dropped
    and replaced on the next use (a fresh connect, bounded by ``connect_timeout``, never a wait on a background
    reconnect: what a partition needs)."""

    def __init__(self, url: str, kwargs: dict[str, Any], size: int) -> None:
        self._url = url
        self._kwargs = kwargs
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()

    def check(self) -> None:
        """Open one connection now (so a wrong URL or password is reported at start)."""
        with self.connection() as conn:
            conn.execute("SELECT 1")

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._slots:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = psycopg.connect(self._url, **self._kwargs)
            try:
                yield conn
            finally:
                if conn.closed or conn.broken:
                    conn.close()
                else:
                    with self._lock:
                        self._idle.append(conn)

    def drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        self.drop_idle()


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
