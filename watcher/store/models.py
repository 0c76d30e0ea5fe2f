"""What the store hands out: file versions, claimed jobs, stored results, remote IDs, problems."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FileVersion:
    """One version of one file, as the store knows it."""

    id: int
    folder: str
    path: str
    rel_path: str
    size: int
    mtime_ns: int
    inode: int
    sha256: str | None
    current: bool


@dataclass
class Job:
    """A claimed unit of work: one pipeline (``kind``) for one file version."""

    id: int
    kind: str
    stage: str
    attempts: int
    data: dict[str, Any]
    file: FileVersion
    last_error: str | None = None
    error_kind: str | None = None


@dataclass(frozen=True)
class StoredResult:
    """One model's results for some content, as first received."""

    requested: str
    model_name: str
    model_version: str | None
    correlation_id: str | None
    results: Any


@dataclass(frozen=True)
class RemoteObject:
    """An object a service created for some content (an upload, a processing job) and its last known state."""

    kind: str
    params: str
    remote_id: str
    state: str
    error: str | None


@dataclass
class Problem:
    """A job that needs attention, for `watcher status`."""

    path: str
    kind: str
    stage: str
    error_kind: str | None
    error: str | None
    attempts: int
    next_attempt_at: float | None
    data: dict[str, Any] = field(default_factory=dict)


def _version(row: sqlite3.Row) -> FileVersion:
    return FileVersion(
        id=row["fid"],
        folder=row["folder"],
        path=row["path"],
        rel_path=row["rel_path"],
        size=row["size"],
        mtime_ns=row["mtime_ns"],
        inode=row["inode"],
        sha256=row["sha256"],
        current=bool(row["current"]),
    )


_JOB_SELECT = """
    SELECT j.*, f.id AS fid, f.folder, f.path, f.rel_path, f.size, f.mtime_ns, f.inode, f.sha256, f.current
    FROM jobs j JOIN files f ON f.id = j.file_id
"""
