"""The PostgreSQL store's revisions and jobs: registration (one registrar per relative path), claims under
``FOR UPDATE SKIP LOCKED`` with leases on the database's clock, fenced commits and releases, next due, counts."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from watcher.names import text
from watcher.store.lanes import LANES
from watcher.store.models import FileRevision, Job, NewRevision, Signatures, State, Step, group_by_folder
from watcher.store.postgres.base import got, path_bytes
from watcher.store.postgres.schema import FENCE, JOB_SELECT, NOT_PAUSED, NOW, TERMINAL_STATES
from watcher.store.rules import fenced, job_fence

if TYPE_CHECKING:
    from watcher.store.postgres.base import PgBase as _Base
else:
    _Base = object


class PgJobsMixin(_Base):
    """The file registry and the jobs (the same contract as the SQLite core's)."""

    # -- registry --------------------------------------------------------------------------------------

    def known_revision(self, path: str, size: int, mtime_ns: int, inode: int) -> bool:
        """True when this revision (size and mtime at this relative path; inodes differ across mounts) is known."""
        where, args = self._where_path(path)
        return (
            self._one(f"SELECT 1 FROM files WHERE {where} AND size=%s AND mtime_ns=%s", (*args, size, mtime_ns))
            is not None
        )

    def current_signatures(self, folder: str) -> Signatures:
        """Every current revision under ``folder``, in one query, grouped by the local folder each is in: folder
        -> name -> (size, mtime_ns, None); the inode is not compared, as in :meth:`known_revision` (another node
        sees other inodes through its mount)."""
        fid = self._fid(folder)
        rows = self._all("SELECT rel_path, size, mtime_ns FROM files WHERE folder_id=%s AND current", (fid,))
        return group_by_folder(
            (os.path.join(folder, os.fsdecode(bytes(r["rel_path"]))), int(r["size"]), int(r["mtime_ns"]), None)
            for r in rows
        )

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
        """Record a settled revision and its jobs; (file id, whether new). Older revisions are superseded;
        ``live`` and ``priority`` place its jobs in the claim order (see store.lanes)."""
        revision = NewRevision(folder, path, rel_path, size, mtime_ns, inode, live, priority)
        jobs = list(jobs)
        return self._run(lambda db: self._register(db, revision, jobs, self._now(db) if now is None else now))

    def register_revisions(
        self, revisions: Sequence[NewRevision], *, jobs: Iterable[tuple[str, Step]], now: float | None = None
    ) -> list[tuple[int, bool]]:
        """:meth:`register_revision` for several revisions in ONE transaction (all or none); answers in order."""
        jobs = list(jobs)

        def go(db: psycopg.Connection[Any]) -> list[tuple[int, bool]]:
            at = self._now(db) if now is None else now  # ``now``: for tests, what the database's clock reads
            # the per-path locks in one order, so that two nodes registering overlapping batches cannot deadlock
            for key in sorted({self._register_lock(v) for v in revisions}):
                db.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
            return [self._register(db, v, jobs, at) for v in revisions]

        return self._run(go)

    def _register_lock(self, v: NewRevision) -> str:
        return f"{self._fid(v.folder)}/{path_bytes(v.rel_path).hex()}"

    def _register(
        self, db: psycopg.Connection[Any], v: NewRevision, jobs: list[tuple[str, Step]], at: float
    ) -> tuple[int, bool]:
        """One revision in an open transaction (see :meth:`register_revision`)."""
        fid = self._fid(v.folder)
        rel = path_bytes(v.rel_path)
        # One registrar per relative path at a time: nodes that see the same file race here.
        db.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (self._register_lock(v),))
        row = db.execute(
            "SELECT id FROM files WHERE folder_id=%s AND rel_path=%s AND size=%s AND mtime_ns=%s",
            (fid, rel, v.size, v.mtime_ns),
        ).fetchone()
        if row is not None:
            return int(row["id"]), False
        old = [
            r["id"]
            for r in db.execute("SELECT id FROM files WHERE folder_id=%s AND rel_path=%s AND current", (fid, rel))
        ]
        if old:
            db.execute("UPDATE files SET current=false WHERE id = ANY(%s)", (old,))
            db.execute(
                "UPDATE jobs SET state='superseded', lease_owner=NULL, lease_until=NULL, updated_at=%s, "
                "last_error='a newer revision of the file arrived' WHERE file_id = ANY(%s) AND state <> ALL(%s)",
                (at, old, list(TERMINAL_STATES)),
            )
        new = db.execute(
            "INSERT INTO files (folder_id, rel_path, folder, path, size, mtime_ns, inode, created_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (fid, rel, path_bytes(v.folder), path_bytes(v.path), v.size, v.mtime_ns, v.inode, at),
        ).fetchone()
        file_id = int(got(new)["id"])
        for pipeline, step in jobs:
            db.execute(
                "INSERT INTO jobs (file_id, pipeline, step, state, next_attempt_at, updated_at, priority, live) "
                "VALUES (%s, %s, %s, 'pending', %s, %s, %s, %s)",
                (file_id, pipeline, step, at, at, v.priority, int(v.live)),
            )
        return file_id, True

    def current_revision(self, path: str) -> FileRevision | None:
        where, args = self._where_path(path, "f.")
        row = self._one(
            "SELECT f.id AS fid, f.* FROM files f WHERE " + where + " AND f.current ORDER BY f.id DESC LIMIT 1", args
        )
        return self._revision(row) if row else None

    def set_sha256(self, file_id: int, sha256: str) -> None:
        self._run(lambda db: db.execute("UPDATE files SET sha256=%s WHERE id=%s", (sha256, file_id)))

    # -- jobs -----------------------------------------------------------------------------------------

    def claim(self, pipeline: str, holder: str, *, lease: float = 600.0, now: float | None = None) -> Job | None:
        """Take the most overdue pending job whose lease is free or expired in claim order (see store.lanes), leased
        to ``holder``. Due times and leases are the database's clock (``now``, for tests only, stands for what it
        reads; a node's own clock is never used: it may be stepped). Each lane is read through its partial index:
        the cost follows the due."""
        mine = "" if self._mine is None else "AND f.folder_id = ANY(%(mine)s) "
        args = {"pipeline": pipeline, "holder": holder, "lease": lease, "mine": self._mine, "at": now}
        at = f"COALESCE(%(at)s::float8, {NOW})"
        lanes = self._order.lanes(pipeline)
        orders = {lane: self._order.order(pipeline, lane) for lane in lanes}

        def go(db: psycopg.Connection[Any]) -> tuple[str, dict[str, Any]] | None:
            for lane in lanes:
                row = db.execute(
                    "SELECT j.id FROM jobs j JOIN files f ON f.id=j.file_id WHERE j.pipeline=%(pipeline)s "
                    f"AND j.state='pending' AND {LANES[lane]} AND j.next_attempt_at <= {at} "
                    f"AND (j.lease_until IS NULL OR j.lease_until < {at}) "
                    + NOT_PAUSED
                    + mine
                    + f"ORDER BY {orders[lane]} LIMIT 1 FOR UPDATE OF j SKIP LOCKED",
                    args,
                ).fetchone()
                if row is not None:
                    break
            else:
                return None
            db.execute(
                f"UPDATE jobs SET lease_owner=%(holder)s, lease_until={at} + %(lease)s, claims=claims+1, "
                f"updated_at={at} WHERE id=%(id)s",
                {**args, "id": row["id"]},
            )
            return lane, got(db.execute(JOB_SELECT + "WHERE j.id=%s", (row["id"],)).fetchone())

        got_one = self._run(go)
        if got_one is None:
            return None
        lane, row = got_one
        self._order.claimed(pipeline, lanes, lane)
        job = self._job(row)
        job.holder = holder
        job.claim = int(row["claims"])
        return job

    def get_job(self, job_id: int) -> Job | None:
        row = self._one(JOB_SELECT + "WHERE j.id=%s", (job_id,))
        return self._job(row) if row else None

    def commit(self, job: Job, *, step: Step | None = None, **data: Any) -> None:
        """Persist progress on a claimed job (its next step and/or data keys); LeaseLost once it is not ours."""
        if step is not None:
            job.step = step
        job.data.update(data)
        n = self._run(
            lambda db: (
                db.execute(
                    f"UPDATE jobs SET step=%s, data=%s, updated_at={NOW} WHERE id=%s" + FENCE,
                    (job.step, json.dumps(job.data), job.id, *job_fence(job)),
                ).rowcount
            )
        )
        fenced(n, job)

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
        delay = 0.0 if next_attempt_at is None else next_attempt_at - self._clock()  # this node's clock: a delay
        n = self._run(
            lambda db: (
                db.execute(
                    f"UPDATE jobs SET state=%s, step=%s, data=%s, attempts=%s, next_attempt_at={NOW} + %s, "
                    "last_error=%s, error_code=%s, lease_owner=NULL, lease_until=NULL, "
                    f"updated_at={NOW} WHERE id=%s" + FENCE,
                    (
                        job.state,
                        job.step,
                        json.dumps(job.data),
                        job.attempts,
                        delay,
                        text(error),
                        error_code,
                        job.id,
                        *job_fence(job),
                    ),
                ).rowcount
            )
        )
        fenced(n, job)
        job.holder = None

    def is_live(self, job: Job) -> bool:
        """True while ``job`` is still held by its claimer and was not superseded (its work still counts)."""
        return self._one("SELECT 1 FROM jobs WHERE id=%s" + FENCE, (job.id, *job_fence(job))) is not None

    def renew(self, job_ids: Iterable[int], holder: str, *, lease: float = 600.0) -> None:
        """Extend the leases ``holder`` holds on these jobs and on the operations it is sending (database clock)."""
        ids = list(job_ids)
        if not ids:
            return

        def go(db: psycopg.Connection[Any]) -> None:
            db.execute(
                f"UPDATE jobs SET lease_until={NOW} + %s WHERE lease_owner=%s AND id = ANY(%s)", (lease, holder, ids)
            )
            db.execute(
                f"UPDATE operations SET lease_until={NOW} + %s WHERE holder=%s AND state='sending'", (lease, holder)
            )

        self._run(go)

    def release_leases(self, holder: str | None = None) -> int:
        """Drop leases: one holder's (at its exit), or every one (only when no other daemon can be running)."""
        args: tuple[Any, ...] = ()
        if holder is None:
            sql = "UPDATE jobs SET lease_owner=NULL, lease_until=NULL WHERE lease_owner IS NOT NULL"
        else:
            sql, args = "UPDATE jobs SET lease_owner=NULL, lease_until=NULL WHERE lease_owner=%s", (holder,)
        return int(self._run(lambda db: db.execute(sql, args).rowcount))

    def next_due(self, pipeline: str) -> float | None:
        """When (this node's clock) the earliest pending job of ``pipeline`` can be claimed: when it is due and,
        if another node holds it, when that lease runs out (so a dead node's work is taken over on time).

        Read as the head of each lane's index (unleased jobs) and the leased ones (few: the jobs in flight,
        through ``jobs_by_owner``); a lease's holder and its end are always set and cleared together."""
        mine = "" if self._mine is None else "AND f.folder_id = ANY(%(mine)s) "
        pending = "FROM jobs j JOIN files f ON f.id=j.file_id WHERE j.pipeline=%(pipeline)s AND j.state='pending' "
        heads = [
            f"(SELECT j.next_attempt_at {pending}AND {lane} AND j.lease_owner IS NULL {NOT_PAUSED}{mine}"
            "ORDER BY j.next_attempt_at LIMIT 1)"
            for lane in LANES.values()
        ]
        leased = (
            f"(SELECT MIN(GREATEST(j.next_attempt_at, COALESCE(j.lease_until, 0))) {pending}"
            f"AND j.lease_owner IS NOT NULL {NOT_PAUSED}{mine})"
        )
        sql = f"SELECT LEAST({', '.join([*heads, leased])}) - {NOW} AS wait"  # a delay: no clock crosses over
        row = self._run(lambda db: db.execute(sql, {"pipeline": pipeline, "mine": self._mine}).fetchone())
        wait = None if row is None else row["wait"]
        return None if wait is None else self._clock() + float(wait)

    def pending(self, pipeline: str | None = None, paths: Iterable[str] | None = None) -> int:
        """How many jobs are pending (of one pipeline, for some paths): counted in the lanes' indexes."""

        def go(db: psycopg.Connection[Any]) -> int:
            where = ""
            args: list[Any] = []
            if pipeline is not None:
                where += " AND j.pipeline=%s"
                args.append(pipeline)
            if paths is not None:
                where += " AND j.file_id = ANY(%s)"
                args.append(self._ids_of_paths(db, paths))
            counts = [
                f"(SELECT COUNT(*) FROM jobs j WHERE j.state='pending' AND {lane}{where})" for lane in LANES.values()
            ]
            return int(got(db.execute(f"SELECT {' + '.join(counts)} AS n", args * len(counts)).fetchone())["n"])

        return int(self._run(go))
