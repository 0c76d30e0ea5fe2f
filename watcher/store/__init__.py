"""The durable store: SQLite in WAL mode, the single source of truth for every file version and its jobs.

One row per file version (path, size, mtime, inode, content hash), one job per version and pipeline
(``analyze``, ``archive``) with its stage, attempts, next attempt, last error and the IDs services returned,
and a content-addressed cache of analysis results. Stages use it through claim (with a lease), commit and
release; it knows nothing of the services.
"""

from __future__ import annotations

from watcher.store.cache import CacheMixin
from watcher.store.control import ControlMixin
from watcher.store.core import StoreBase
from watcher.store.models import FileVersion, Job, Problem, RemoteObject, StoredResult
from watcher.store.schema import TERMINAL

__all__ = ["TERMINAL", "FileVersion", "Job", "Problem", "RemoteObject", "Store", "StoredResult"]


class Store(CacheMixin, ControlMixin, StoreBase):
    """SQLite-backed store; safe to share between the event loop and worker threads of one process."""
