"""When the store counts as away, what a caller is told then, and what `watcher status` reads of it.

Away: PostgreSQL unreachable, restarting, shut down, out of disk or read-only (a lost connection; SQLSTATE classes
08, 53, 57P, 58, 25006; the adapter's StoreUnavailable); SQLite busy, locked, read-only, out of disk or failing I/O.
Any other error is the caller's, as before.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

from watcher.errors import Deferred
from watcher.fsutil import read_json_object
from watcher.store.ports import StoreUnavailable

OUTAGE_FILE = "store-outage.json"  # in the state folder while the store is unreachable: what `watcher status` shows
# SQLite primary result codes that mean "the store cannot be written now": BUSY, LOCKED, READONLY, IOERR, FULL,
# CANTOPEN, PROTOCOL
SQLITE_UNAVAILABLE = frozenset({5, 6, 8, 10, 13, 14, 15})
PG_UNAVAILABLE = ("08", "53", "57P", "58", "25006")


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the store cannot be used now (rather than something wrong with the call)."""
    if isinstance(exc, ConnectionError):  # the PostgreSQL adapter's StoreUnreachable
        return True
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in SQLITE_UNAVAILABLE
        text = str(exc)
        return any(w in text for w in ("locked", "readonly", "disk", "unable to open"))
    psycopg = sys.modules.get("psycopg")  # only a PostgreSQL store raises its errors, and it imported them
    if psycopg is None:
        return False
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = getattr(exc, "sqlstate", None)
        return state is None or str(state).startswith(PG_UNAVAILABLE)
    return False


def read_outage(state_dir: Path) -> dict[str, Any] | None:
    """What a running daemon last said about its store being unreachable (None: it is reachable, or none runs)."""
    doc = read_json_object(state_dir / OUTAGE_FILE)
    if doc is None:
        return None
    try:
        os.kill(int(doc.pop("pid")), 0)  # a daemon that died leaves the file behind
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return doc


class StoreAway(Deferred, StoreUnavailable):
    """The store cannot be used now: the job waits (a Deferred: no attempt counted) until it is back. It is the
    port's StoreUnavailable too, as the guard tells it to a caller instead of making it wait."""

    def __init__(self, message: str, *, until: float) -> None:
        super().__init__(message, until=until, code="store_unavailable", routine=True)
