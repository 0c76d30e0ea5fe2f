"""The SQLite adapter: one file in WAL mode, the store of one machine (its SQL and its connection only; the
decisions are :mod:`watcher.store.rules`').

One connection shared by the event loop's store threads and the workers under a lock; transactions are
``BEGIN IMMEDIATE``; migrations follow ``PRAGMA user_version`` (:mod:`~watcher.store.sqlite.schema`), a copy made
first (:mod:`~watcher.store.sqlite.backup`). The parts are mixins combined in :class:`Store`: the core (files and
jobs), the gate, the results cache, the listing and the control rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from watcher.store.sqlite.cache import CacheMixin
from watcher.store.sqlite.control import ControlMixin
from watcher.store.sqlite.core import StoreBase
from watcher.store.sqlite.gate import GateMixin
from watcher.store.sqlite.listing import ListingMixin

__all__ = ["Store"]


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

    def heartbeat(self, name: str, *, holder: str, version: str, folders: Sequence[str] = ()) -> None:
        """No other node reads it: nothing is kept."""

    def nodes(self) -> list[dict[str, Any]]:
        """No node list: `watcher status` shows none."""
        return []
