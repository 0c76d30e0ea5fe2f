"""The durable store: SQLite in WAL mode, the single source of truth for every file version and its jobs.

One row per file version (path, size, mtime, inode, content hash), one job per version and pipeline
(``analyze``, ``archive``) with its step, state, attempts, next attempt, lease and last error,
a content-addressed cache of analysis results, and the gate every paid operation passes (with its spend
ledger). Stages use it through claim (with a lease), commit and release, and the gate; it knows nothing of
the services.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from watcher.store.cache import CacheMixin
from watcher.store.control import ControlMixin
from watcher.store.core import StoreBase
from watcher.store.gate import GateMixin
from watcher.store.listing import FileQuery, Listed, ListingMixin
from watcher.store.models import Fence, FileVersion, Job, NewVersion, Operation, Problem, StoredResult, Ticket
from watcher.store.rules import LeaseLost, next_utc_midnight, utc_day
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
    """SQLite-backed store; safe to share between the event loop and worker threads of one process.

    It is the store of one machine: as the ``Nodes`` port it answers as the only node (see below)."""

    store_id: str | None = None  # kept beside the database (watcher.markers.store_id), not in it

    def use_folders(self, folders: dict[str, str], *, claim_only_these: bool = True) -> None:
        """Nothing to map: paths are this machine's own."""

    def claim_node_name(self, name: str, node_id: str) -> None:
        """No other node can answer to the name: the state folder's lock already keeps a second daemon out."""

    def release_node(self, node_id: str, keep: str) -> tuple[int, int]:
        """Every lease and take is this node's: all of them are given back (at start, under the state lock)."""
        return self.release_leases(), self.gate_recover()

    def node_alive(self, node_id: str) -> bool | None:
        """There is no other node to ask about."""
        return None

    def heartbeat(self, name: str, *, owner: str, version: str, folders: Sequence[str] = ()) -> None:
        """No other node reads it: nothing is kept."""

    def nodes(self) -> list[dict[str, Any]]:
        """No node list: `watcher status` shows none."""
        return []
