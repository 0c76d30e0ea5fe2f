"""The durable store: SQLite in WAL mode, the single source of truth for every file version and its jobs.

One row per file version (path, size, mtime, inode, content hash), one job per version and pipeline
(``analyze``, ``archive``) with its step, state, attempts, next attempt, lease and last error,
a content-addressed cache of analysis results, and the gate every paid operation passes (with its spend
ledger). Stages use it through claim (with a lease), commit and release, and the gate; it knows nothing of
the services.
"""

from __future__ import annotations

from watcher.store.cache import CacheMixin
from watcher.store.control import ControlMixin
from watcher.store.core import LeaseLost, StoreBase
from watcher.store.gate import GateMixin, next_utc_midnight, utc_day
from watcher.store.listing import FileQuery, Listed, ListingMixin
from watcher.store.models import Fence, FileVersion, Job, NewVersion, Operation, Problem, StoredResult, Ticket
from watcher.store.schema import STATES, TERMINAL

__all__ = [
    "STATES",
    "TERMINAL",
    "Fence",
    "FileQuery",
    "FileVersion",
    "Job",
    "LeaseLost",
    "Listed",
    "NewVersion",
    "Operation",
    "Problem",
    "Store",
    "StoredResult",
    "Ticket",
    "next_utc_midnight",
    "utc_day",
]


class Store(GateMixin, CacheMixin, ListingMixin, ControlMixin, StoreBase):
    """SQLite-backed store; safe to share between the event loop and worker threads of one process."""
