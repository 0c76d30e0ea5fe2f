"""The durable store, the single source of truth for every revision and its jobs: SQLite in WAL mode
(:mod:`watcher.store.sqlite`) or PostgreSQL (:mod:`watcher.store.postgres`), both behind the ports of
:mod:`watcher.store.ports` and both deciding through the same rules (:mod:`watcher.store.rules`).

One row per revision (path, size, mtime, inode, content hash), one job per revision and pipeline
(``analyze``, ``archive``) with its step, state, attempts, next attempt, lease and last error,
a content-addressed cache of analysis results, and the gate every paid operation passes (with its spend
ledger). Steps use it through claim (with a lease), commit and release, and the gate; it knows nothing of
the services.
"""

from __future__ import annotations

from watcher.store.models import (
    STATES,
    TERMINAL,
    Fence,
    FileQuery,
    FileRevision,
    Job,
    Listed,
    NewRevision,
    Operation,
    Problem,
    State,
    Step,
    StoredResult,
    Ticket,
)
from watcher.store.rules import LeaseLost, next_utc_midnight, utc_day
from watcher.store.sqlite import Store
from watcher.store.sqlite import backup as backup

__all__ = [
    "STATES",
    "TERMINAL",
    "Fence",
    "FileQuery",
    "FileRevision",
    "Job",
    "LeaseLost",
    "Listed",
    "NewRevision",
    "Operation",
    "Problem",
    "State",
    "Step",
    "Store",
    "StoredResult",
    "Ticket",
    "backup",
    "next_utc_midnight",
    "utc_day",
]
