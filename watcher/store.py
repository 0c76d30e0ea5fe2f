"""The durable store: SQLite in WAL mode, the single source of truth for every file version and its jobs.

One row per file version (path, size, mtime, inode, content hash), one job per version and pipeline
(``analyze``, ``archive``) with its stage, attempts, next attempt, last error and the IDs services returned,
and a content-addressed cache of analysis results. Stages use it through claim (with a lease), commit and
release; it knows nothing of the services.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TERMINAL = frozenset({"done", "failed", "skipped", "superseded", "gone"})
SCHEMA = [
    # version 1
    """
    CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        folder TEXT NOT NULL,
        path TEXT NOT NULL,
        rel_path TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL,
        sha256 TEXT,
        current INTEGER NOT NULL DEFAULT 1,
        created_at REAL NOT NULL,
        UNIQUE (path, size, mtime_ns, inode)
    );
    CREATE INDEX files_by_path ON files (path, current);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        file_id INTEGER NOT NULL REFERENCES files (id),
        kind TEXT NOT NULL,
        stage TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        error_kind TEXT,
        lease_owner TEXT,
        lease_until REAL,
        data TEXT NOT NULL DEFAULT '{}',
        updated_at REAL NOT NULL,
        UNIQUE (file_id, kind)
    );
    CREATE INDEX jobs_due ON jobs (kind, stage, next_attempt_at);
    CREATE TABLE results (
        sha256 TEXT NOT NULL,
        backend TEXT NOT NULL,
        requested TEXT NOT NULL,
        model_name TEXT NOT NULL,
        model_version TEXT,
        correlation_id TEXT,
        results TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (sha256, backend, requested)
    );
    """,
    # version 2: IDs returned by paid remote calls, keyed by content, so no call is ever paid twice
    """
    CREATE TABLE remote (
        sha256 TEXT NOT NULL,
        service TEXT NOT NULL,
        kind TEXT NOT NULL,
        params TEXT NOT NULL,
        remote_id TEXT NOT NULL,
        state TEXT NOT NULL,
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (sha256, service, kind, params)
    );
    """,
    # version 3: folders paused by `watcher pause`, kept across restarts
    """
    CREATE TABLE folder_state (
        path TEXT PRIMARY KEY,
        paused INTEGER NOT NULL DEFAULT 0,
        mode TEXT,
        reason TEXT,
        available INTEGER,
        updated_at REAL NOT NULL
    );
    """,
]
_NOT_PAUSED = "AND f.folder NOT IN (SELECT path FROM folder_state WHERE paused=1) "


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


class Store:
    """SQLite-backed store; safe to share between the event loop and worker threads of one process."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(SCHEMA[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

    # -- file versions -------------------------------------------------------------------------------

    def known_version(self, path: str, size: int, mtime_ns: int, inode: int) -> bool:
        """True when this exact version of the path is already in the store."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM files WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
                (path, size, mtime_ns, inode),
            ).fetchone()
        return row is not None

    def register_version(
        self,
        *,
        folder: str,
        path: str,
        rel_path: str,
        size: int,
        mtime_ns: int,
        inode: int,
        jobs: Iterable[tuple[str, str]],
        now: float | None = None,
    ) -> tuple[int, bool]:
        """Record a settled file version and its jobs ``(kind, first stage)``; (file id, whether new).

        Older versions of the same path stop being current and their unfinished jobs become superseded.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM files WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
                (path, size, mtime_ns, inode),
            ).fetchone()
            if row is not None:
                return int(row["id"]), False
            old = [r["id"] for r in db.execute("SELECT id FROM files WHERE path=? AND current=1", (path,))]
            for file_id in old:
                db.execute("UPDATE files SET current=0 WHERE id=?", (file_id,))
                db.execute(
                    "UPDATE jobs SET stage='superseded', lease_owner=NULL, lease_until=NULL, updated_at=?, "
                    "last_error='a newer version of the file arrived' "
                    f"WHERE file_id=? AND stage NOT IN ({','.join('?' * len(TERMINAL))})",
                    (now, file_id, *TERMINAL),
                )
            cur = db.execute(
                "INSERT INTO files (folder, path, rel_path, size, mtime_ns, inode, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (folder, path, rel_path, size, mtime_ns, inode, now),
            )
            file_id = int(cur.lastrowid or 0)
            for kind, stage in jobs:
                db.execute(
                    "INSERT INTO jobs (file_id, kind, stage, next_attempt_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                    (file_id, kind, stage, now, now),
                )
            return file_id, True

    def set_sha256(self, file_id: int, sha256: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE files SET sha256=? WHERE id=?", (sha256, file_id))

    def current_version(self, path: str) -> FileVersion | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id AS fid, * FROM files WHERE path=? AND current=1 ORDER BY id DESC LIMIT 1", (path,)
            ).fetchone()
        return _version(row) if row else None

    # -- jobs -----------------------------------------------------------------------------------------

    def claim(self, kind: str, owner: str, *, lease: float = 600.0, now: float | None = None) -> Job | None:
        """Take the most overdue unleased job of ``kind``, leasing it to ``owner``; None when nothing is due."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                _JOB_SELECT + f"WHERE j.kind=? AND j.stage NOT IN ({','.join('?' * len(TERMINAL))}) "
                "AND j.next_attempt_at <= ? AND (j.lease_until IS NULL OR j.lease_until < ?) "
                + _NOT_PAUSED
                + "ORDER BY j.next_attempt_at, j.id LIMIT 1",
                (kind, *TERMINAL, now, now),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET lease_owner=?, lease_until=?, updated_at=? WHERE id=?",
                (owner, now + lease, now, row["id"]),
            )
        return self._job(row)

    def _job(self, row: sqlite3.Row) -> Job:
        return Job(
            id=row["id"],
            kind=row["kind"],
            stage=row["stage"],
            attempts=row["attempts"],
            data=json.loads(row["data"]),
            file=_version(row),
            last_error=row["last_error"],
            error_kind=row["error_kind"],
        )

    def get_job(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._db.execute(_JOB_SELECT + "WHERE j.id=?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def commit(self, job: Job, *, stage: str | None = None, **data: Any) -> None:
        """Persist progress on a claimed job (new stage and/or data keys) before anything else happens."""
        if stage is not None:
            job.stage = stage
        job.data.update(data)
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET stage=?, data=?, updated_at=? WHERE id=?",
                (job.stage, json.dumps(job.data), time.time(), job.id),
            )

    def release(
        self,
        job: Job,
        *,
        stage: str | None = None,
        next_attempt_at: float | None = None,
        error: str | None = None,
        error_kind: str | None = None,
        count_attempt: bool = False,
    ) -> None:
        """Give a job back: finished (terminal stage), or scheduled for ``next_attempt_at`` with its error."""
        if stage is not None:
            job.stage = stage
        if count_attempt:
            job.attempts += 1
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET stage=?, data=?, attempts=?, next_attempt_at=?, last_error=?, error_kind=?, "
                "lease_owner=NULL, lease_until=NULL, updated_at=? WHERE id=?",
                (
                    job.stage,
                    json.dumps(job.data),
                    job.attempts,
                    next_attempt_at if next_attempt_at is not None else now,
                    error,
                    error_kind,
                    now,
                    job.id,
                ),
            )

    def renew(self, job_ids: Iterable[int], owner: str, *, lease: float = 600.0) -> None:
        """Extend the leases ``owner`` holds on these jobs."""
        ids = list(job_ids)
        if not ids:
            return
        with self._tx() as db:
            db.execute(
                f"UPDATE jobs SET lease_until=? WHERE lease_owner=? AND id IN ({','.join('?' * len(ids))})",
                (time.time() + lease, owner, *ids),
            )

    def release_leases(self, owner: str | None = None) -> int:
        """Drop leases (all, or one owner's): used at start-up under the state folder's lock, and at exit."""
        with self._tx() as db:
            if owner is None:
                cur = db.execute("UPDATE jobs SET lease_owner=NULL, lease_until=NULL WHERE lease_owner IS NOT NULL")
            else:
                cur = db.execute("UPDATE jobs SET lease_owner=NULL, lease_until=NULL WHERE lease_owner=?", (owner,))
            return cur.rowcount

    def next_due(self, kind: str) -> float | None:
        """When the earliest unfinished, unleased job of ``kind`` is due (None: nothing pending)."""
        with self._lock:
            row = self._db.execute(
                f"SELECT MIN(j.next_attempt_at) FROM jobs j JOIN files f ON f.id=j.file_id WHERE j.kind=? "
                f"AND j.stage NOT IN ({','.join('?' * len(TERMINAL))}) AND j.lease_owner IS NULL " + _NOT_PAUSED,
                (kind, *TERMINAL),
            ).fetchone()
        return row[0]

    def pending(self, kind: str | None = None, paths: Iterable[str] | None = None) -> int:
        """How many unfinished jobs there are (of one kind, for some paths)."""
        sql = "SELECT COUNT(*) FROM jobs j JOIN files f ON f.id=j.file_id WHERE j.stage NOT IN "
        sql += f"({','.join('?' * len(TERMINAL))})"
        args: list[Any] = [*TERMINAL]
        if kind is not None:
            sql += " AND j.kind=?"
            args.append(kind)
        if paths is not None:
            plist = list(paths)
            sql += f" AND f.path IN ({','.join('?' * len(plist))})"
            args.extend(plist)
        with self._lock:
            return int(self._db.execute(sql, args).fetchone()[0])

    # -- analysis results (content-addressed) -----------------------------------------------------------

    def results_for(self, sha256: str, backend: str) -> dict[str, StoredResult]:
        """Results already paid for on this content with this backend, keyed by the requested model spec."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM results WHERE sha256=? AND backend=?", (sha256, backend)).fetchall()
        return {
            r["requested"]: StoredResult(
                r["requested"],
                r["model_name"],
                r["model_version"],
                r["correlation_id"],
                json.loads(r["results"]),
            )
            for r in rows
        }

    def save_result(self, sha256: str, backend: str, result: StoredResult) -> None:
        """Persist one model's results the moment they arrive (a lost result would be paid for again)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sha256,
                    backend,
                    result.requested,
                    result.model_name,
                    result.model_version,
                    result.correlation_id,
                    json.dumps(result.results),
                    time.time(),
                ),
            )

    # -- IDs returned by paid calls ----------------------------------------------------------------------

    def remote_get(self, sha256: str, service: str, kind: str, params: str) -> RemoteObject | None:
        """The object already created for this content, kind and parameters, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM remote WHERE sha256=? AND service=? AND kind=? AND params=?",
                (sha256, service, kind, params),
            ).fetchone()
        return (
            None
            if row is None
            else RemoteObject(row["kind"], row["params"], row["remote_id"], row["state"], row["error"])
        )

    def remote_put(
        self, sha256: str, service: str, kind: str, params: str, remote_id: str, state: str = "requested"
    ) -> None:
        """Record an ID the moment a paid call returned it, before anything else happens."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO remote VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                (sha256, service, kind, params, remote_id, state, now, now),
            )

    def remote_set_state(
        self, sha256: str, service: str, kind: str, params: str, state: str, error: str | None = None
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE remote SET state=?, error=?, updated_at=? WHERE sha256=? AND service=? AND kind=? AND params=?",
                (state, error, time.time(), sha256, service, kind, params),
            )

    def remote_forget(self, sha256: str, service: str, kind: str, params: str) -> None:
        """Drop an object the service no longer knows (so it is created again, knowingly)."""
        with self._tx() as db:
            db.execute(
                "DELETE FROM remote WHERE sha256=? AND service=? AND kind=? AND params=?",
                (sha256, service, kind, params),
            )

    # -- folders ---------------------------------------------------------------------------------------

    def set_paused(self, folder: str, paused: bool) -> None:
        """Pause or resume work on a folder's files (detection still records them, so nothing is lost)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO folder_state (path, paused, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (path) DO UPDATE SET paused=excluded.paused, updated_at=excluded.updated_at",
                (folder, int(paused), time.time()),
            )

    def paused_folders(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT path FROM folder_state WHERE paused=1")}

    def set_folder_health(self, folder: str, *, mode: str | None, reason: str | None, available: bool) -> None:
        """What the running daemon sees of a folder (watch mode, why, reachable), for `watcher status`."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO folder_state (path, mode, reason, available, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (path) DO UPDATE SET mode=excluded.mode, reason=excluded.reason, "
                "available=excluded.available, updated_at=excluded.updated_at",
                (folder, mode, reason, int(available), time.time()),
            )

    def folder_states(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM folder_state ORDER BY path").fetchall()
        return [
            {
                "folder": r["path"],
                "paused": bool(r["paused"]),
                "mode": r["mode"],
                "reason": r["reason"],
                "available": None if r["available"] is None else bool(r["available"]),
                "updated_at": r["updated_at"],
            }
            for r in rows
        ]

    # -- reporting and control -------------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        """Jobs per kind and stage, for the current versions of files."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for row in self._db.execute(
                "SELECT j.kind, j.stage, COUNT(*) AS n FROM jobs j JOIN files f ON f.id=j.file_id "
                "WHERE f.current=1 GROUP BY j.kind, j.stage ORDER BY j.kind, j.stage"
            ):
                out.setdefault(row["kind"], {})[row["stage"]] = row["n"]
        return out

    def problems(self) -> list[Problem]:
        """Current versions whose jobs failed, or are waiting to retry after an error."""
        with self._lock:
            rows = self._db.execute(
                _JOB_SELECT + "WHERE f.current=1 AND (j.stage='failed' OR (j.last_error IS NOT NULL "
                f"AND j.stage NOT IN ({','.join('?' * len(TERMINAL))}))) ORDER BY f.path, j.kind",
                tuple(TERMINAL),
            ).fetchall()
        return [
            Problem(
                path=r["path"],
                kind=r["kind"],
                stage=r["stage"],
                error_kind=r["error_kind"],
                error=r["last_error"],
                attempts=r["attempts"],
                next_attempt_at=None if r["stage"] in TERMINAL else r["next_attempt_at"],
                data=json.loads(r["data"]),
            )
            for r in rows
        ]

    def jobs_of_file(self, file_id: int) -> list[Job]:
        """Every job of one file version."""
        with self._lock:
            rows = self._db.execute(_JOB_SELECT + "WHERE f.id=? ORDER BY j.kind", (file_id,)).fetchall()
        return [self._job(r) for r in rows]

    def jobs_of_current(self) -> list[Job]:
        """Every job of every current file version (for the per-file view of `watcher status`)."""
        with self._lock:
            rows = self._db.execute(_JOB_SELECT + "WHERE f.current=1 ORDER BY f.path, j.kind").fetchall()
        return [self._job(r) for r in rows]

    def retry(
        self, *, paths: Iterable[str] | None = None, failed_only: bool = True, restart_stage: dict[str, str]
    ) -> int:
        """Make failed (or all unfinished) jobs of current versions due now; returns how many were reset.

        ``restart_stage`` maps a kind to the stage a failed job of that kind restarts from.
        """
        now = time.time()
        changed = 0
        with self._tx() as db:
            sql = _JOB_SELECT + "WHERE f.current=1"
            args: list[Any] = []
            if paths is not None:
                plist = list(paths)
                sql += f" AND f.path IN ({','.join('?' * len(plist))})"
                args.extend(plist)
            for row in db.execute(sql, args).fetchall():
                failed = row["stage"] == "failed"
                waiting = row["stage"] not in TERMINAL
                if not (failed or (waiting and not failed_only) or (paths is not None and waiting)):
                    continue
                stage = row["stage"]
                if failed:
                    data = json.loads(row["data"])
                    stage = data.get("failed_in") or restart_stage.get(row["kind"], "pending")
                db.execute(
                    "UPDATE jobs SET stage=?, attempts=0, next_attempt_at=?, last_error=NULL, error_kind=NULL, "
                    "updated_at=? WHERE id=?",
                    (stage, now, now, row["id"]),
                )
                changed += 1
        return changed
