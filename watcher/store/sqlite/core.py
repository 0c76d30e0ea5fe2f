"""The store's core: one SQLite connection (WAL), transactions, migrations, revisions and jobs."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from watcher.names import from_db, text, to_db
from watcher.store import models
from watcher.store.lanes import FIRST, LANES, ClaimOrder
from watcher.store.models import _JOB_SELECT, TERMINAL, FileRevision, Job, NewRevision, State, Step, _revision
from watcher.store.rules import fenced, job_fence, job_of, too_new
from watcher.store.sqlite.backup import before_migration
from watcher.store.sqlite.schema import _NOT_PAUSED, SCHEMA, statements


class StoreBase:
    """The connection, transactions, migrations, revisions and jobs."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        """Open (and create or migrate) the store at ``path``; ``readonly`` opens an existing one for reading only
        (nothing is created or changed: `watcher scan --dry-run`)."""
        self.path = path
        self._lock = threading.RLock()
        self._order = ClaimOrder()
        if readonly:
            self._db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, check_same_thread=False, timeout=30)
            self._db.row_factory = sqlite3.Row
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version != len(SCHEMA):
                self._db.close()
                if version > len(SCHEMA):
                    raise too_new(str(path), version, len(SCHEMA))
                raise sqlite3.OperationalError(f"the store at {path} is from another version of watcher")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(SCHEMA):  # a newer watcher used it: never touched (see watcher.store.sqlite.backup)
            self._db.close()
            raise too_new(str(path), version, len(SCHEMA))
        self._enable_wal()
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        if 0 < version < len(SCHEMA):
            before_migration(self._db, path, version)
        self._migrate()

    def _enable_wal(self, patience: float = 30.0) -> None:
        """Switch to WAL once; another process creating the store at the same moment may hold the lock."""
        deadline = time.monotonic() + patience
        while self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

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

    def _write(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        """One statement as its own transaction: SQLite takes the write lock as a writing statement starts (waiting
        for it as ``BEGIN IMMEDIATE`` does) and commits when it ends, with no BEGIN and COMMIT round trips."""
        with self._lock:
            return self._db.execute(sql, args)

    def _migrate(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(SCHEMA[version:], start=version + 1):
                for statement in statements(script):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

    # -- revisions -----------------------------------------------------------------------------------

    def known_revision(self, path: str, size: int, mtime_ns: int, inode: int) -> bool:
        """True when this exact revision of the path is already in the store."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM files WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
                (to_db(path), size, mtime_ns, inode),
            ).fetchone()
        return row is not None

    def current_signatures(self, folder: str) -> models.Signatures:
        """Every current revision recorded under ``folder``, in one query, grouped by the folder each is in:
        folder path -> name -> (size, mtime_ns, inode).

        What a folder scan compares its listing with, so a file already recorded as it is costs no query.
        """
        with self._lock:
            cur = self._db.cursor()
            cur.row_factory = None  # plain tuples: a folder may hold a hundred thousand rows
            rows = cur.execute(
                "SELECT path, size, mtime_ns, inode FROM files WHERE folder=? AND current=1", (to_db(folder),)
            ).fetchall()
        return models.group_by_folder(rows, from_db)

    def register_revision(
        self,
        *,
        folder: str,
        path: str,
        rel_path: str,
        size: int,
        mtime_ns: int,
        inode: int,
        jobs: Iterable[tuple[str, Step]],
        now: float | None = None,
        live: bool = False,
        priority: int = 0,
    ) -> tuple[int, bool]:
        """Record a settled revision and its jobs ``(pipeline, first step)``; (file id, whether new).

        Older revisions of the same path stop being current and their unfinished jobs become superseded. ``live``
        and ``priority`` place its jobs in the claim order (see store.lanes).
        """
        now = time.time() if now is None else now
        revision = NewRevision(folder, path, rel_path, size, mtime_ns, inode, live, priority)
        with self._tx() as db:
            return self._register(db, revision, list(jobs), now)

    def register_revisions(
        self, revisions: Sequence[NewRevision], *, jobs: Iterable[tuple[str, Step]], now: float | None = None
    ) -> list[tuple[int, bool]]:
        """:meth:`register_revision` for several revisions in ONE transaction (all or none); answers in order."""
        now = time.time() if now is None else now
        jobs = list(jobs)
        with self._tx() as db:
            return [self._register(db, v, jobs, now) for v in revisions]

    def _register(
        self, db: sqlite3.Connection, v: NewRevision, jobs: list[tuple[str, Step]], now: float
    ) -> tuple[int, bool]:
        """One revision in an open transaction (see :meth:`register_revision`)."""
        folder, path, rel_path, size, mtime_ns, inode = v.folder, v.path, v.rel_path, v.size, v.mtime_ns, v.inode
        # this exact revision (known: nothing to do) and the path's current one (to replace), in one read
        rows = db.execute(
            "SELECT id, current, size=? AND mtime_ns=? AND inode=? AS same FROM files "
            "WHERE path=? AND (current=1 OR (size=? AND mtime_ns=? AND inode=?))",
            (size, mtime_ns, inode, to_db(path), size, mtime_ns, inode),
        ).fetchall()
        for r in rows:
            if r["same"]:
                return int(r["id"]), False
        old = [r["id"] for r in rows if r["current"]]
        for file_id in old:
            db.execute("UPDATE files SET current=0 WHERE id=?", (file_id,))
            db.execute(
                "UPDATE jobs SET state='superseded', lease_owner=NULL, lease_until=NULL, updated_at=?, "
                "last_error='a newer revision of the file arrived' "
                f"WHERE file_id=? AND state NOT IN ({_TERMINAL_MARKS})",
                (now, file_id, *TERMINAL),
            )
        cur = db.execute(
            "INSERT INTO files (folder, path, rel_path, size, mtime_ns, inode, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (to_db(folder), to_db(path), to_db(rel_path), size, mtime_ns, inode, now),
        )
        file_id = int(cur.lastrowid or 0)
        for pipeline, step in jobs:
            db.execute(
                "INSERT INTO jobs (file_id, pipeline, step, state, next_attempt_at, updated_at, priority, live) "
                "VALUES (?, ?, ?, 'pending', ?, ?, ?, ?)",
                (file_id, pipeline, step, now, now, v.priority, int(v.live)),
            )
        return file_id, True

    def set_sha256(self, file_id: int, sha256: str) -> None:
        self._write("UPDATE files SET sha256=? WHERE id=?", (sha256, file_id))

    def current_revision(self, path: str) -> FileRevision | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id AS fid, * FROM files WHERE path=? AND current=1 ORDER BY id DESC LIMIT 1", (to_db(path),)
            ).fetchone()
        return _revision(row) if row else None

    # -- jobs -----------------------------------------------------------------------------------------

    def claim(self, pipeline: str, holder: str, *, lease: float = 600.0, now: float | None = None) -> Job | None:
        """Take the most overdue unleased pending job of ``pipeline`` in claim order (see store.lanes), leased to
        ``holder``; None when none is due. Each lane is read through its partial index: the cost follows the due."""
        now = time.time() if now is None else now
        with self._tx() as db:
            lanes = self._order.lanes(pipeline)
            for lane in lanes:
                order = self._order.order(pipeline, lane)
                select = _JOB_SELECT
                if order == FIRST:  # without statistics SQLite would sort the due rows of the other index
                    select = select.replace("FROM jobs j ", "FROM jobs j INDEXED BY jobs_due_first ")
                row = db.execute(
                    select + f"WHERE j.pipeline=? AND j.state='pending' AND {LANES[lane]} "
                    "AND j.next_attempt_at <= ? AND (j.lease_until IS NULL OR j.lease_until < ?) "
                    + _NOT_PAUSED
                    + f"ORDER BY {order} LIMIT 1",
                    (pipeline, now, now),
                ).fetchone()
                if row is not None:
                    break
            else:
                return None
            db.execute(
                "UPDATE jobs SET lease_owner=?, lease_until=?, claims=claims+1, updated_at=? WHERE id=?",
                (holder, now + lease, now, row["id"]),
            )
            self._order.claimed(pipeline, lanes, lane)
        job = self._job(row)
        job.holder = holder
        job.claim = int(row["claims"]) + 1
        return job

    def _job(self, row: sqlite3.Row) -> Job:
        return job_of(row, _revision(row))

    def get_job(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._db.execute(_JOB_SELECT + "WHERE j.id=?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def commit(self, job: Job, *, step: Step | None = None, **data: Any) -> None:
        """Persist progress on a claimed job (its next step and/or data keys) before anything else happens."""
        if step is not None:
            job.step = step
        job.data.update(data)
        cur = self._write(
            "UPDATE jobs SET step=?, data=?, updated_at=? WHERE id=?" + _FENCE,
            (job.step, json.dumps(job.data), time.time(), job.id, *_fence(job)),
        )
        _fenced(cur, job)

    def release(
        self,
        job: Job,
        *,
        state: State = State.PENDING,
        step: Step | None = None,
        next_attempt_at: float | None = None,
        error: str | None = None,
        error_code: str | None = None,
        count_attempt: bool = False,
    ) -> None:
        """Give a job back: ended (a final ``state``), held (``in_doubt``), or pending until ``next_attempt_at``."""
        job.given_back(state, step, count_attempt=count_attempt)
        now = time.time()
        cur = self._write(
            "UPDATE jobs SET state=?, step=?, data=?, attempts=?, next_attempt_at=?, last_error=?, error_code=?, "
            "lease_owner=NULL, lease_until=NULL, updated_at=? WHERE id=?" + _FENCE,
            (
                job.state,
                job.step,
                json.dumps(job.data),
                job.attempts,
                next_attempt_at if next_attempt_at is not None else now,
                text(error),
                error_code,
                now,
                job.id,
                *_fence(job),
            ),
        )
        _fenced(cur, job)
        job.holder = None

    def is_live(self, job: Job) -> bool:
        """True while ``job`` is still held by its claimer and was not superseded (its work still counts)."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM jobs WHERE id=?" + _FENCE, (job.id, *_fence(job))).fetchone()
        return row is not None

    def renew(self, job_ids: Iterable[int], holder: str, *, lease: float = 600.0) -> None:
        """Extend the leases ``holder`` holds on these jobs."""
        ids = list(job_ids)
        if not ids:
            return
        with self._tx() as db:
            db.execute(
                f"UPDATE jobs SET lease_until=? WHERE lease_owner=? AND id IN ({','.join('?' * len(ids))})",
                (time.time() + lease, holder, *ids),
            )
            db.execute(
                "UPDATE operations SET lease_until=? WHERE holder=? AND state='sending'", (time.time() + lease, holder)
            )

    def release_leases(self, holder: str | None = None) -> int:
        """Drop leases (all, or one holder's): used at start-up under the state folder's lock, and at exit."""
        with self._tx() as db:
            if holder is None:
                cur = db.execute("UPDATE jobs SET lease_owner=NULL, lease_until=NULL WHERE lease_owner IS NOT NULL")
            else:
                cur = db.execute("UPDATE jobs SET lease_owner=NULL, lease_until=NULL WHERE lease_owner=?", (holder,))
            return cur.rowcount

    def next_due(self, pipeline: str) -> float | None:
        """When the earliest pending, unleased job of ``pipeline`` is due (None: nothing pending): the head of
        each lane's index, past the jobs leased or paused."""
        heads = [
            "SELECT (SELECT j.next_attempt_at FROM jobs j JOIN files f ON f.id=j.file_id WHERE j.pipeline=? "
            f"AND j.state='pending' AND {lane} AND j.lease_owner IS NULL {_NOT_PAUSED}"
            "ORDER BY j.next_attempt_at LIMIT 1) AS due"
            for lane in LANES.values()
        ]
        with self._lock:
            row = self._db.execute(
                f"SELECT MIN(due) FROM ({' UNION ALL '.join(heads)})", (pipeline,) * len(heads)
            ).fetchone()
        return None if row[0] is None else float(row[0])

    def pending(self, pipeline: str | None = None, paths: Iterable[str] | None = None) -> int:
        """How many jobs are pending (of one pipeline, for some paths): counted in the lanes' indexes."""
        where = ""
        args: list[Any] = []
        if pipeline is not None:
            where += " AND j.pipeline=?"
            args.append(pipeline)
        if paths is not None:
            plist = list(paths)
            where += f" AND j.file_id IN (SELECT id FROM files WHERE path IN ({','.join('?' * len(plist))}))"
            args.extend(to_db(p) for p in plist)
        with self._lock:
            return sum(
                int(
                    self._db.execute(
                        f"SELECT COUNT(*) FROM jobs j WHERE j.state='pending' AND {lane}" + where, args
                    ).fetchone()[0]
                )
                for lane in LANES.values()
            )

    def prune(self, older_than_days: float, *, now: float | None = None) -> int:
        """Forget revisions that were replaced or deleted and whose jobs all ended ``older_than_days`` ago.

        Results and paid operation IDs are kept for good; so are current revisions (they make a restart cheap).
        Returns how many revisions were forgotten. Only replaced revisions and those with a job ``gone`` are read
        (through ``files_replaced``, from the oldest, and ``jobs_gone``), never every file: a revision created after
        the cutoff has a job that changed since, so it is not read.
        """
        cutoff = (time.time() if now is None else now) - older_than_days * 86400
        terminal = ",".join("?" * len(TERMINAL))
        with self._tx() as db:
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT f.id FROM files f WHERE f.id IN (SELECT id FROM files INDEXED BY files_replaced "
                    "WHERE current=0 AND created_at < ? UNION SELECT file_id FROM jobs WHERE state='gone') "
                    "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.file_id=f.id AND "
                    f"(j.state NOT IN ({terminal}) OR j.updated_at >= ?)) AND (f.current=0 OR NOT EXISTS "
                    "(SELECT 1 FROM jobs j WHERE j.file_id=f.id AND j.state != 'gone'))",
                    (cutoff, *TERMINAL, cutoff),
                )
            ]
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                db.execute(f"DELETE FROM jobs WHERE file_id IN ({marks})", chunk)
                db.execute(f"DELETE FROM files WHERE id IN ({marks})", chunk)
        return len(ids)


# A job's row changes only while its holder keeps the lease and it has not been superseded.
_DEAD = (State.SUPERSEDED, State.GONE)
_FENCE = " AND lease_owner IS ? AND (? IS NULL OR claims=?) AND state NOT IN (?, ?)"


def _fence(job: Job) -> tuple[Any, ...]:
    """The arguments of ``_FENCE`` for ``job``: its lease holder, its claim (None: any) and the dead states."""
    return (*job_fence(job), *_DEAD)


_TERMINAL_MARKS = ",".join("?" * len(TERMINAL))


def _fenced(cur: sqlite3.Cursor, job: Job) -> None:
    fenced(cur.rowcount, job)
