"""The PostgreSQL store's foundation: connection, clocks, folder IDs, files, jobs and results."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row

from watcher.names import text
from watcher.store.lanes import LANES, ClaimOrder
from watcher.store.models import Fence, FileVersion, Job, NewVersion, Operation, StoredResult
from watcher.store.ports import StoreUnavailable
from watcher.store.postgres.pool import CONNECT_SECONDS, Pool, StoreUnreachable, first_line, redact
from watcher.store.postgres.schema import (
    FENCE,
    JOB_SELECT,
    KEY_WHERE,
    LOCK_KEY,
    NOT_PAUSED,
    NOW,
    OP_FENCED,
    OP_UNHELD,
    SCHEMA,
    TERMINAL_STATES,
)
from watcher.store.rules import StoreTooNew, fence_args, fenced, job_fence, job_of, op_key, too_new

T = TypeVar("T")


def path_bytes(path: str) -> bytes:
    """A path as the store keeps it: its exact bytes."""
    return os.fsencode(path)


class PgBase:
    """Connection, clocks, folder IDs, the file registry, jobs and results: what the other parts build on."""

    def __init__(
        self,
        url: str,
        *,
        passfile: str | None = None,
        clock: Callable[[], float] = time.time,
        pool_size: int = 4,
        readonly: bool = False,
        lease: float = 600.0,
        name: str = "watcher",
    ) -> None:
        """Connect (and create or migrate the schema, unless ``readonly``); ``clock`` is this node's clock (used only
        to turn delays into its own times and back, never for a lease), ``name`` the application name its
        connections show in ``pg_stat_activity``."""
        self.url = url
        self.where = redact(url)
        self.lease = lease  # the longest a paid operation stays taken without renewal (the runner's lease)
        self._clock = clock
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "row_factory": dict_row,
            "application_name": name[:63],
        }
        if passfile:
            kwargs["passfile"] = passfile
        self._pool = Pool(url, kwargs, pool_size)
        try:
            self._pool.check()
        except (psycopg.OperationalError, StoreUnavailable) as exc:
            self._pool.close()
            raise StoreUnreachable(f"cannot reach the store at {self.where}: {first_line(exc)}") from None
        self._folders: dict[str, str] = {}  # local folder path -> folder ID
        self._paths: dict[str, str] = {}  # folder ID -> local folder path
        self._mine: list[str] | None = None  # claims only in these folder IDs (None: any)
        self._order = ClaimOrder()
        if not readonly:
            try:
                self._migrate()
            except StoreTooNew:
                self._pool.close()
                raise
        else:
            row = self._one("SELECT version FROM schema_version") if self._has_schema() else None
            if row is not None and int(row["version"]) > len(SCHEMA):
                self._pool.close()
                raise too_new(self.where, int(row["version"]), len(SCHEMA))
        self.store_id = self._meta("store_id")

    # -- plumbing -----------------------------------------------------------------------------------

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[Any]]:
        """One transaction on a pooled connection."""
        with self._pool.connection() as conn, conn.transaction():
            yield conn

    def _run(self, fn: Callable[[psycopg.Connection[Any]], T], *, attempts: int = 3) -> T:
        """``fn`` in one transaction; a connection lost before commit (a partition, pg_terminate_backend, a
        restart) is retried on a fresh connection while the call is young. A commit whose answer was lost may run
        twice: every caller is idempotent or fenced (a second claim by the same owner, a take that then waits on
        itself). StoreUnavailable once the database cannot answer (each try is bounded: see ``pool``)."""
        started = time.monotonic()
        for attempt in range(attempts):
            try:
                with self._tx() as conn:
                    return fn(conn)
            except psycopg.OperationalError as exc:
                self._pool.drop_idle()  # a partition or a server restart breaks every idle connection too
                if attempt == attempts - 1 or time.monotonic() - started > CONNECT_SECONDS:
                    raise StoreUnavailable(f"the store at {self.where} did not answer: {first_line(exc)}") from exc
                time.sleep(0.05 * (attempt + 1))  # sleep-ok: a short pause before reconnecting
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _one(self, sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None:
        return self._run(lambda c: c.execute(sql, args).fetchone())

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self._run(lambda c: c.execute(sql, args).fetchall())

    def _migrate(self) -> None:
        def go(db: psycopg.Connection[Any]) -> None:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row["version"])
            if version > len(SCHEMA):  # a newer watcher used it: never touched
                raise too_new(self.where, version, len(SCHEMA))
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (0)")
            for number, script in enumerate(SCHEMA[version:], start=version + 1):
                db.execute(script)  # our constant DDL
                db.execute("UPDATE schema_version SET version=%s", (number,))
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('store_id', %s) ON CONFLICT (key) DO NOTHING",
                (f"postgresql:{uuid.uuid4()}",),
            )

        # no deadline: DDL on a big table is slow
        with self._pool.connection(bounded=False) as conn, conn.transaction():
            conn.execute("SET LOCAL statement_timeout = 0")
            go(conn)

    def _has_schema(self) -> bool:
        row = self._one("SELECT to_regclass('schema_version') IS NOT NULL AS there")
        return bool(row and row["there"])

    def _meta(self, key: str) -> str:
        row = self._one("SELECT value FROM meta WHERE key=%s", (key,))
        if row is None:
            raise StoreUnreachable(f"the store at {self.where} has no schema yet: start a daemon first")
        return str(row["value"])

    # -- clocks: the database's decides; this node's only turns delays into its own times and back -------------

    @staticmethod
    def _now(db: psycopg.Connection[Any]) -> float:
        """The database's clock, read in the open transaction (``now()``: the transaction's start)."""
        return float(got(db.execute(f"SELECT {NOW} AS t").fetchone())["t"])

    def _offset(self) -> float:
        """The database's clock minus this node's, measured now (never cached): for showing stored times only."""
        before = self._clock()
        db = self._run(self._now)
        return float(db - (before + self._clock()) / 2)

    def _local_time(self, t: float) -> float:
        """A stored time (database clock) as this node's clock shows it, for status and messages."""
        return t - self._offset()

    # -- folders: local paths <-> folder IDs --------------------------------------------------------------

    def use_folders(self, folders: dict[str, str], *, claim_only_these: bool = True) -> None:
        """This node's watched folders (local path -> folder ID from the marker); claims stay within them."""
        self._folders = dict(folders)
        self._paths = {fid: path for path, fid in folders.items()}
        self._mine = sorted(set(folders.values())) if claim_only_these and folders else None

    def _fid(self, folder: str) -> str:
        return self._folders.get(folder, folder)

    def _locate(self, path: str) -> tuple[str, bytes] | None:
        """(folder ID, relative path) of a local path under one of this node's folders, or None."""
        best = None
        for folder in self._folders:
            prefix = folder.rstrip("/") + "/"
            if path.startswith(prefix) and (best is None or len(folder) > len(best)):
                best = folder
        if best is None:
            return None
        return self._folders[best], path_bytes(os.path.relpath(path, best))

    def _where_path(self, path: str, alias: str = "") -> tuple[str, tuple[Any, ...]]:
        """A WHERE fragment naming the file at a local path (by folder ID and relative path when known)."""
        located = self._locate(path)
        if located is not None:
            return f"{alias}folder_id=%s AND {alias}rel_path=%s", located
        return f"{alias}path=%s", (path_bytes(path),)

    def _ids_of_paths(self, db: psycopg.Connection[Any], paths: Iterable[str]) -> list[int]:
        ids: list[int] = []
        for p in paths:
            where, args = self._where_path(p)
            ids.extend(int(r["id"]) for r in db.execute(f"SELECT id FROM files WHERE {where}", args))
        return ids

    def _version(self, row: dict[str, Any]) -> FileVersion:
        rel = os.fsdecode(bytes(row["rel_path"]))
        local = self._paths.get(row["folder_id"])
        if local is not None:
            folder, path = local, os.path.join(local, rel)
        else:
            folder, path = os.fsdecode(bytes(row["folder"])), os.fsdecode(bytes(row["path"]))
        return FileVersion(
            id=int(row["fid"]),
            folder=folder,
            path=path,
            rel_path=rel,
            size=int(row["size"]),
            mtime_ns=int(row["mtime_ns"]),
            inode=int(row["inode"]),
            sha256=row["sha256"],
            current=bool(row["current"]),
        )

    def _job(self, row: dict[str, Any]) -> Job:
        job = job_of(row, self._version(row))
        job.holder = row.get("lease_owner") if row.get("lease_until") else None
        return job

    # -- registry --------------------------------------------------------------------------------------

    def known_version(self, path: str, size: int, mtime_ns: int, inode: int) -> bool:
        """True when this version (size and mtime at this relative path; inodes differ across mounts) is known."""
        where, args = self._where_path(path)
        return (
            self._one(f"SELECT 1 FROM files WHERE {where} AND size=%s AND mtime_ns=%s", (*args, size, mtime_ns))
            is not None
        )

    def current_signatures(self, folder: str) -> dict[str, tuple[int, int, int | None]]:
        """Every current version under ``folder``, in one query: local path -> (size, mtime_ns, None); the inode
        is not compared, as in :meth:`known_version` (another node sees other inodes through its mount)."""
        fid = self._fid(folder)
        rows = self._all("SELECT rel_path, size, mtime_ns FROM files WHERE folder_id=%s AND current", (fid,))
        return {
            os.path.join(folder, os.fsdecode(bytes(r["rel_path"]))): (int(r["size"]), int(r["mtime_ns"]), None)
            for r in rows
        }

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
        live: bool = False,
        priority: int = 0,
    ) -> tuple[int, bool]:
        """Record a settled file version and its jobs; (file id, whether new). Older versions are superseded;
        ``live`` and ``priority`` place its jobs in the claim order (see store.lanes)."""
        version = NewVersion(folder, path, rel_path, size, mtime_ns, inode, live, priority)
        jobs = list(jobs)
        return self._run(lambda db: self._register(db, version, jobs, self._now(db) if now is None else now))

    def register_versions(
        self, versions: Sequence[NewVersion], *, jobs: Iterable[tuple[str, str]], now: float | None = None
    ) -> list[tuple[int, bool]]:
        """:meth:`register_version` for several versions in ONE transaction (all or none); answers in order."""
        jobs = list(jobs)

        def go(db: psycopg.Connection[Any]) -> list[tuple[int, bool]]:
            at = self._now(db) if now is None else now  # ``now``: for tests, what the database's clock reads
            # the per-path locks in one order, so that two nodes registering overlapping batches cannot deadlock
            for key in sorted({self._register_lock(v) for v in versions}):
                db.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
            return [self._register(db, v, jobs, at) for v in versions]

        return self._run(go)

    def _register_lock(self, v: NewVersion) -> str:
        return f"{self._fid(v.folder)}/{path_bytes(v.rel_path).hex()}"

    def _register(
        self, db: psycopg.Connection[Any], v: NewVersion, jobs: list[tuple[str, str]], at: float
    ) -> tuple[int, bool]:
        """One version in an open transaction (see :meth:`register_version`)."""
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
                "last_error='a newer version of the file arrived' WHERE file_id = ANY(%s) AND state <> ALL(%s)",
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

    def current_version(self, path: str) -> FileVersion | None:
        where, args = self._where_path(path, "f.")
        row = self._one(
            "SELECT f.id AS fid, f.* FROM files f WHERE " + where + " AND f.current ORDER BY f.id DESC LIMIT 1", args
        )
        return self._version(row) if row else None

    def set_sha256(self, file_id: int, sha256: str) -> None:
        self._run(lambda db: db.execute("UPDATE files SET sha256=%s WHERE id=%s", (sha256, file_id)))

    # -- jobs -----------------------------------------------------------------------------------------

    def claim(self, pipeline: str, owner: str, *, lease: float = 600.0, now: float | None = None) -> Job | None:
        """Take the most overdue pending job whose lease is free or expired in claim order (see store.lanes), leased
        to ``owner``. Due times and leases are the database's clock (``now``, for tests only, stands for what it
        reads; a node's own clock is never used: it may be stepped). Each lane is read through its partial index:
        the cost follows the due."""
        mine = "" if self._mine is None else "AND f.folder_id = ANY(%(mine)s) "
        args = {"pipeline": pipeline, "owner": owner, "lease": lease, "mine": self._mine, "at": now}
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
                f"UPDATE jobs SET lease_owner=%(owner)s, lease_until={at} + %(lease)s, claims=claims+1, "
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
        job.owner = owner
        job.claim = int(row["claims"])
        return job

    def get_job(self, job_id: int) -> Job | None:
        row = self._one(JOB_SELECT + "WHERE j.id=%s", (job_id,))
        return self._job(row) if row else None

    def commit(self, job: Job, *, step: str | None = None, **data: Any) -> None:
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
        state: str = "pending",
        step: str | None = None,
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
        job.owner = None

    def is_live(self, job: Job) -> bool:
        """True while ``job`` is still held by its claimer and was not superseded (its work still counts)."""
        return self._one("SELECT 1 FROM jobs WHERE id=%s" + FENCE, (job.id, *job_fence(job))) is not None

    def renew(self, job_ids: Iterable[int], owner: str, *, lease: float = 600.0) -> None:
        """Extend the leases ``owner`` holds on these jobs and on the operations it is sending (database clock)."""
        ids = list(job_ids)
        if not ids:
            return

        def go(db: psycopg.Connection[Any]) -> None:
            db.execute(
                f"UPDATE jobs SET lease_until={NOW} + %s WHERE lease_owner=%s AND id = ANY(%s)", (lease, owner, ids)
            )
            db.execute(
                f"UPDATE operations SET lease_until={NOW} + %s WHERE holder=%s AND state='sending'", (lease, owner)
            )

        self._run(go)

    def release_leases(self, owner: str | None = None) -> int:
        """Drop leases: one owner's (at its exit), or every one (only when no other daemon can be running)."""
        args: tuple[Any, ...] = ()
        if owner is None:
            sql = "UPDATE jobs SET lease_owner=NULL, lease_until=NULL WHERE lease_owner IS NOT NULL"
        else:
            sql, args = "UPDATE jobs SET lease_owner=NULL, lease_until=NULL WHERE lease_owner=%s", (owner,)
        return int(self._run(lambda db: db.execute(sql, args).rowcount))

    def next_due(self, pipeline: str) -> float | None:
        """When (this node's clock) the earliest pending job of ``pipeline`` can be claimed: when it is due and,
        if another node holds it, when that lease runs out (so a dead node's work is taken over on time).

        Read as the head of each lane's index (unleased jobs) and the leased ones (few: the jobs in flight,
        through ``jobs_by_owner``); a lease's owner and its end are always set and cleared together."""
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

    # -- results ---------------------------------------------------------------------------------------

    def results_for(self, sha256: str, backend: str) -> dict[str, StoredResult]:
        """Results already paid for on this content with this backend (by any node), keyed by model spec."""
        rows = self._all("SELECT * FROM results WHERE sha256=%s AND backend=%s", (sha256, backend))
        return {
            r["requested"]: StoredResult(
                r["requested"], r["model_name"], r["model_version"], r["correlation_id"], json.loads(r["results"])
            )
            for r in rows
        }

    def save_result(
        self, sha256: str, backend: str, result: StoredResult, op: Operation | None = None, fence: Fence | None = None
    ) -> bool:
        """Persist one model's results the moment they arrive; with ``op`` (and its take's ``fence``), mark it
        answered in the same transaction. False when that take lost the operation (late): the results are kept
        beside (never over) a newer holder's, and the operation changes only when nobody holds it."""

        def go(db: psycopg.Connection[Any]) -> bool:
            fenced = True
            if op is not None:
                assert fence is not None, "a paid result names the take that sent it"
                fenced = op_answered(db, op, None, fence, remote=False)
            db.execute(
                f"INSERT INTO results VALUES (%s, %s, %s, %s, %s, %s, %s, {NOW}) "
                "ON CONFLICT (sha256, backend, requested) "
                + (
                    "DO UPDATE SET model_name=excluded.model_name, model_version=excluded.model_version, "
                    "correlation_id=excluded.correlation_id, results=excluded.results, created_at=excluded.created_at"
                    if fenced
                    else "DO NOTHING"
                ),
                (
                    sha256,
                    backend,
                    result.requested,
                    result.model_name,
                    result.model_version,
                    result.correlation_id,
                    json.dumps(result.results),
                ),
            )
            return fenced

        return bool(self._run(go))


def got(row: Any) -> Any:
    """A row a statement always returns (RETURNING, a row locked just after its insert)."""
    assert row is not None
    return row


def set_op_state(db: psycopg.Connection[Any], op: Operation, state: str, now: float, *, error: str | None) -> None:
    db.execute(
        "UPDATE operations SET state=%s, holder=NULL, lease_until=NULL, error=%s, updated_at=%s, "
        f"since=CASE WHEN %s='in_doubt' THEN %s ELSE since END WHERE {KEY_WHERE}",
        (state, text(error), now, state, now, *op_key(op)),
    )
    adopt_late(db, op)


def op_answered(db: psycopg.Connection[Any], op: Operation, result: str | None, fence: Fence, *, remote: bool) -> bool:
    """The answer to the take ``fence`` names, in an open transaction: answered when that take still holds the
    operation (True); a late answer (False) is adopted where nobody holds it, else kept in ``late_result``."""
    keep = "result=COALESCE(%s, result), " + ("remote_state=COALESCE(remote_state, 'requested'), " if remote else "")
    done = f"UPDATE operations SET state='answered', {keep}holder=NULL, lease_until=NULL, error=NULL, since=NULL, "
    key = op_key(op)
    if db.execute(done + f"updated_at={NOW} WHERE {KEY_WHERE}{OP_FENCED}", (result, *key, *fence_args(fence))).rowcount:
        return True
    if not db.execute(done + f"updated_at={NOW} WHERE {KEY_WHERE}{OP_UNHELD}", (result, *key)).rowcount and result:
        db.execute(
            f"UPDATE operations SET late_result=COALESCE(late_result, %s) WHERE {KEY_WHERE} "
            "AND result IS DISTINCT FROM %s",
            (result, *key, result),
        )
    return False


def adopt_late(db: psycopg.Connection[Any], op: Operation) -> None:
    """An operation nobody holds any more whose late answer was kept is answered by it (never sent again)."""
    db.execute(
        "UPDATE operations SET state='answered', result=late_result, late_result=NULL, error=NULL, since=NULL, "
        f"remote_state=COALESCE(remote_state, 'requested'), updated_at={NOW} WHERE {KEY_WHERE}{OP_UNHELD} "
        "AND late_result IS NOT NULL",
        op_key(op),
    )


def opt_local(store: PgBase, t: float | None) -> float | None:
    return None if t is None else store._local_time(t)

