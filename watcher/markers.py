"""Folder ownership: a hidden ``.watcher-folder`` marker in each watched folder names the store that owns it.

The marker (JSON) holds the owning store's ID and the folder's own ID. Daemons sharing one PostgreSQL store
find the same store ID and use the folder ID to match the folder across machines (each may mount the share
elsewhere). A daemon whose store differs (a second SQLite daemon, another database) leaves the folder alone
and says so; `watcher adopt FOLDER` takes it over deliberately. The marker is never work: it matches no audio
pattern and gets no sidecar.

A SQLite store's ID lives in ``state_dir/store-id``; a PostgreSQL store's in its ``meta`` table.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from watcher.names import display

MARKER = ".watcher-folder"
STORE_ID_FILE = "store-id"


@dataclass(frozen=True)
class Ownership:
    """What a folder's marker says of it, seen from one store."""

    folder: str
    folder_id: str  # the marker's folder ID (or the local path when no marker could be written)
    owner: str | None  # the store that owns it (None: no marker, and none could be written)
    ours: bool

    @property
    def reason(self) -> str | None:
        """Why this daemon leaves the folder alone (None: it works on it)."""
        if self.ours:
            return None
        return f"owned by another store ({self.owner}); `watcher adopt {display(self.folder)}` takes it over"


class Identified(Protocol):
    """A store that may keep its own identity (see watcher.store.ports.Nodes)."""

    @property
    def store_id(self) -> str | None: ...


def store_id(store: Identified | None, state_dir: Path) -> str:
    """The store's identity: a shared store says it itself; a SQLite one (or none opened) keeps it beside the
    database."""
    own = store.store_id if store is not None else None
    if own:
        return own
    path = state_dir / STORE_ID_FILE
    with contextlib.suppress(FileNotFoundError):
        value = path.read_text(encoding="utf-8").strip()
        if value:
            return value
    state_dir.mkdir(parents=True, exist_ok=True)
    _create(path, f"sqlite:{uuid.uuid4()}\n")
    return path.read_text(encoding="utf-8").strip()


def read_marker(folder: Path, *, retry: bool = True) -> dict[str, Any] | None:
    """The folder's marker as written, None when there is none; an unreadable one reads as owned by nobody known."""
    try:
        raw = (folder / MARKER).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        return {"store": f"unknown (the marker cannot be read: {exc.strerror})", "folder_id": ""}
    try:
        data = json.loads(raw)
    except ValueError:
        if not retry:
            return {"store": "unknown (the marker is not valid JSON)", "folder_id": ""}
        time.sleep(0.2)  # sleep-ok: another node may be writing it this instant (create, then one write)
        return read_marker(folder, retry=False)
    return data if isinstance(data, dict) else {"store": "unknown (the marker is not an object)", "folder_id": ""}


def inspect(folder: Path, store: str) -> Ownership:
    """What the marker says of ``folder`` for ``store``, writing nothing (status, doctor, short commands)."""
    marker = read_marker(folder)
    if marker is None:
        return Ownership(str(folder), str(folder), None, True)
    owner = str(marker.get("store", ""))
    return Ownership(str(folder), str(marker.get("folder_id") or folder), owner, owner == store)


def claim(folder: Path, store: str, node: str) -> Ownership:
    """At start: mark an unmarked folder as ours (exactly one of several starting nodes wins), then inspect it.

    A folder that cannot be written to (a read-only share) is worked on unmarked, keyed by its local path.
    """
    folder_id = str(uuid.uuid4())
    try:
        _create(folder / MARKER, _marker(store, folder_id, node))
    except OSError:
        return inspect(folder, store)  # marked already (by us, another node, another store) or read-only
    return Ownership(str(folder), folder_id, store, True)


def adopt(folder: Path, store: str, node: str) -> Ownership:
    """`watcher adopt`: make ``store`` the folder's owner, keeping its folder ID (so its files keep their identity)."""
    marker = read_marker(folder) or {}
    folder_id = str(marker.get("folder_id") or uuid.uuid4())
    tmp = folder / f".{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(_marker(store, folder_id, node, previous=marker.get("store")), encoding="utf-8")
    os.replace(tmp, folder / MARKER)
    return inspect(folder, store)


def _marker(store: str, folder_id: str, node: str, previous: Any = None) -> str:
    data = {
        "about": "watcher: which store works on this folder; change it with `watcher adopt FOLDER`",
        "store": store,
        "folder_id": folder_id,
        "marked_by": node,
        "marked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if previous:
        data["previous_store"] = previous
    return json.dumps(data, indent=2) + "\n"


def _create(path: Path, text: str) -> None:
    """Write ``path`` only if it does not exist: an exclusive create (one winner, also on NFSv3+ and SMB), then
    one small write; few calls, since a slow share takes a second or more per call."""
    with open(path, "x", encoding="utf-8") as fh:
        fh.write(text)
