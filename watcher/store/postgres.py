"""The PostgreSQL adapter: the same store ports as SQLite, shared by several daemons on several machines.

Design (see README "Several machines"):

- Claims take ``SELECT ... FOR UPDATE SKIP LOCKED`` on the due job and stamp a lease in the *database's* clock;
  the runner's lease keeper renews leases; an expired lease (a dead node) is simply claimable again by the next
  claim: there is no sweeper. Every time a caller passes (``now``, ``next_attempt_at``) is read in the caller's
  clock and converted to the database's with the node's measured skew (whole seconds, re-measured every minute),
  so a node whose clock is off neither steals leases nor starves; times handed back are converted the same way.
- The gate's take is one transaction under ``operations``' primary key, with the day's ``spend`` row locked
  (``SELECT ... FOR UPDATE``), so two nodes never both send one operation and a cap is never passed.
- Paths are ``bytea``: the exact bytes of the name (``os.fsencode``), whatever the encoding. A file is identified
  across machines by the folder ID from the folder's marker (``watcher.markers``) and its path relative to that
  folder, plus size and mtime; not by the absolute path (mounts differ) nor the inode (SMB ``noserverino``
  numbers differ per client). Each node hands its local folder → folder ID map to :meth:`PostgresStore.use_folders`
  and gets its own absolute paths back.
- Migrations are versioned (``schema_version``) and run under an advisory lock. psycopg 3 with a small pool
  (:class:`_Pool`: a broken connection is replaced by a fresh connect at once);
  no LISTEN/NOTIFY (works behind PgBouncer in transaction mode): workers poll.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row

from watcher.names import text
from watcher.store.core import LeaseLost
from watcher.store.gate import WAIT_SECONDS, next_utc_midnight, utc_day
from watcher.store.models import FileVersion, Job, Operation, Problem, StoredResult, Ticket
from watcher.store.schema import STATES, TERMINAL

_LOCK_KEY = 0x77617463  # the advisory lock migrations run under ("watc")
SKEW_REFRESH = 60.0
SCHEMA = [
    # version 1
    """
    CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
    CREATE TABLE files (
        id bigserial PRIMARY KEY,
        folder_id text NOT NULL,
        rel_path bytea NOT NULL,
        folder bytea NOT NULL,
        path bytea NOT NULL,
        size bigint NOT NULL,
        mtime_ns bigint NOT NULL,
        inode bigint NOT NULL,
        sha256 text,
        current boolean NOT NULL DEFAULT true,
        created_at double precision NOT NULL,
        UNIQUE (folder_id, rel_path, size, mtime_ns)
    );
    CREATE INDEX files_current ON files (folder_id, rel_path) WHERE current;
    CREATE INDEX files_by_path ON files (path) WHERE current;
    CREATE TABLE jobs (
        id bigserial PRIMARY KEY,
        file_id bigint NOT NULL REFERENCES files (id),
        pipeline text NOT NULL,
        step text NOT NULL,
        state text NOT NULL DEFAULT 'pending',
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at double precision NOT NULL,
        last_error text,
        error_code text,
        lease_owner text,
        lease_until double precision,
        data text NOT NULL DEFAULT '{}',
        updated_at double precision NOT NULL,
        UNIQUE (file_id, pipeline)
    );
    CREATE INDEX jobs_due ON jobs (pipeline, state, next_attempt_at);
    CREATE INDEX jobs_by_owner ON jobs (lease_owner) WHERE lease_owner IS NOT NULL;
    CREATE TABLE results (
        sha256 text NOT NULL,
        backend text NOT NULL,
        requested text NOT NULL,
        model_name text NOT NULL,
        model_version text,
        correlation_id text,
        results text NOT NULL,
        created_at double precision NOT NULL,
        PRIMARY KEY (sha256, backend, requested)
    );
    CREATE TABLE operations (
        sha256 text NOT NULL,
        service text NOT NULL,
        operation text NOT NULL,
        params text NOT NULL,
        on_doubt text NOT NULL,
        state text NOT NULL,
        result text,
        remote_state text,
        remote_error text,
        holder text,
        lease_until double precision,
        sends integer NOT NULL DEFAULT 0,
        error text,
        since double precision,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        PRIMARY KEY (sha256, service, operation, params)
    );
    CREATE TABLE ledger (
        id bigserial PRIMARY KEY,
        at double precision NOT NULL,
        day text NOT NULL,
        service text NOT NULL,
        operation text NOT NULL,
        sha256 text NOT NULL,
        seconds double precision NOT NULL,
        models integer NOT NULL DEFAULT 0,
        outcome text NOT NULL
    );
    CREATE INDEX ledger_by_day ON ledger (day, service);
    CREATE TABLE spend (
        day text NOT NULL,
        service text NOT NULL,
        seconds double precision NOT NULL DEFAULT 0,
        calls integer NOT NULL DEFAULT 0,
        capped_at double precision,
        PRIMARY KEY (day, service)
    );
    CREATE TABLE folder_state (
        folder_id text PRIMARY KEY,
        folder bytea NOT NULL,
        paused boolean NOT NULL DEFAULT false,
        mode text,
        reason text,
        available boolean,
        updated_at double precision NOT NULL
    );
    CREATE TABLE nodes (
        name text PRIMARY KEY,
        owner text NOT NULL,
        version text NOT NULL,
        started_at double precision NOT NULL,
        heartbeat_at double precision NOT NULL,
        folders text NOT NULL DEFAULT '[]'
    );
    """,
]
_NOT_PAUSED = "AND f.folder_id NOT IN (SELECT folder_id FROM folder_state WHERE paused) "
_JOB_SELECT = """
    SELECT j.*, f.id AS fid, f.folder_id, f.folder, f.path, f.rel_path, f.size, f.mtime_ns, f.inode, f.sha256,
           f.current
    FROM jobs j JOIN files f ON f.id = j.file_id
"""
# A job's row changes only while its holder keeps the lease and it has not been superseded.
_FENCE = " AND lease_owner IS NOT DISTINCT FROM %s AND state NOT IN ('superseded', 'gone')"
_KEY = "sha256=%s AND service=%s AND operation=%s AND params=%s"
_TERMINAL = tuple(sorted(TERMINAL))


def _b(path: str) -> bytes:
    return os.fsencode(path)


def _key(op: Operation) -> tuple[str, str, str, str]:
    return (op.sha256, op.service, op.name, op.params)


def redact(url: str) -> str:
    """A libpq URL or conninfo without its password, for logs, status and messages."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(an unreadable store url)"
    user = params.get("user", "")
    host = params.get("host", "localhost")
    port = params.get("port", "5432")
    return f"postgresql://{str(user) + '@' if user else ''}{host}:{port}/{params.get('dbname', '')}"


class StoreUnreachable(ConnectionError):
    """The database could not be reached at start (the message names it, never the password)."""


class PostgresStore:
    """The store in PostgreSQL: safe for many threads of many daemons on many machines at once."""

    shared = True  # several daemons use it at once: leases are not given back wholesale at start

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
        """Connect (and create or migrate the schema, unless ``readonly``); ``clock`` is this node's clock,
        ``name`` the application name its connections show in ``pg_stat_activity``."""
        self.url = url
        self.where = redact(url)
        self.lease = lease  # the longest a paid operation stays taken without renewal (the runner's lease)
        self._clock = clock
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "row_factory": dict_row,
            "connect_timeout": 10,
            "application_name": name[:63],
        }
        if passfile:
            kwargs["passfile"] = passfile
        self._pool = _Pool(url, kwargs, pool_size)
        try:
            self._pool.check()
        except psycopg.OperationalError as exc:
            self._pool.close()
            raise StoreUnreachable(f"cannot reach the store at {self.where}: {_first_line(exc)}") from None
        self._folders: dict[str, str] = {}  # local folder path -> folder ID
        self._paths: dict[str, str] = {}  # folder ID -> local folder path
        self._mine: list[str] | None = None  # claims only in these folder IDs (None: any)
        self._skew = 0.0
        self._skew_at = -SKEW_REFRESH
        self._skew_lock = threading.Lock()
        if not readonly:
            self._migrate()
        self.store_id = self._meta("store_id")

    # -- plumbing -----------------------------------------------------------------------------------

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[Any]]:
        """One transaction on a pooled connection."""
        with self._pool.connection() as conn, conn.transaction():
            yield conn

    def _run(self, fn: Callable[[psycopg.Connection[Any]], Any], *, attempts: int = 3) -> Any:
        """``fn`` in one transaction; a connection lost before commit (a partition, pg_terminate_backend, a
        restart) is retried on a fresh connection. A commit whose answer was lost may run twice: every caller
        is idempotent or fenced (a second claim by the same owner, a take that then waits on itself)."""
        for attempt in range(attempts):
            try:
                with self._tx() as conn:
                    return fn(conn)
            except psycopg.OperationalError:
                self._pool.drop_idle()  # a partition or a server restart breaks every idle connection too
                if attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))  # sleep-ok: a short pause before reconnecting
        return None

    def _one(self, sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None:
        return self._run(lambda c: c.execute(sql, args).fetchone())  # type: ignore[no-any-return]

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self._run(lambda c: c.execute(sql, args).fetchall())  # type: ignore[no-any-return]

    def _migrate(self) -> None:
        def go(db: psycopg.Connection[Any]) -> None:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row["version"])
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (0)")
            for number, script in enumerate(SCHEMA[version:], start=version + 1):
                db.execute(script)  # our constant DDL
                db.execute("UPDATE schema_version SET version=%s", (number,))
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('store_id', %s) ON CONFLICT (key) DO NOTHING",
                (f"postgresql:{uuid.uuid4()}",),
            )

        self._run(go)

    def _meta(self, key: str) -> str:
        row = self._one("SELECT value FROM meta WHERE key=%s", (key,))
        if row is None:
            raise StoreUnreachable(f"the store at {self.where} has no schema yet: start a daemon first")
        return str(row["value"])

    # -- clocks: callers speak their own clock, the database keeps its own ------------------------------

    def skew(self) -> float:
        """The database's clock minus this node's, in whole seconds (re-measured every minute)."""
        now = time.monotonic()
        with self._skew_lock:
            if now - self._skew_at >= SKEW_REFRESH:
                before = self._clock()
                row = self._one("SELECT extract(epoch FROM clock_timestamp())::float8 AS t")
                after = self._clock()
                assert row is not None
                self._skew = float(round(row["t"] - (before + after) / 2))
                self._skew_at = now
            return self._skew

    def _db_time(self, t: float | None = None) -> float:
        """A time of this node's clock (default: now) in the database's clock."""
        return (self._clock() if t is None else t) + self.skew()

    def _local_time(self, t: float) -> float:
        return t - self.skew()

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
        return self._folders[best], _b(os.path.relpath(path, best))

    def _where_path(self, path: str, alias: str = "") -> tuple[str, tuple[Any, ...]]:
        """A WHERE fragment naming the file at a local path (by folder ID and relative path when known)."""
        located = self._locate(path)
        if located is not None:
            return f"{alias}folder_id=%s AND {alias}rel_path=%s", located
        return f"{alias}path=%s", (_b(path),)

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
        job = Job(
            id=int(row["id"]),
            pipeline=row["pipeline"],
            step=row["step"],
            state=row["state"],
            attempts=int(row["attempts"]),
            data=json.loads(row["data"]),
            file=self._version(row),
            last_error=row["last_error"],
            error_code=row["error_code"],
        )
        job.holder = row.get("lease_owner") if row.get("lease_until") else None  # type: ignore[attr-defined]
        return job

    # -- registry --------------------------------------------------------------------------------------

    def known_version(self, path: str, size: int, mtime_ns: int, inode: int) -> bool:
        """True when this version (size and mtime at this relative path; inodes differ across mounts) is known."""
        where, args = self._where_path(path)
        return (
            self._one(f"SELECT 1 FROM files WHERE {where} AND size=%s AND mtime_ns=%s", (*args, size, mtime_ns))
            is not None
        )

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
        """Record a settled file version and its jobs; (file id, whether new). Older versions are superseded."""
        fid = self._fid(folder)
        rel = _b(rel_path)
        jobs = list(jobs)
        at = self._db_time(now)

        def go(db: psycopg.Connection[Any]) -> tuple[int, bool]:
            # One registrar per relative path at a time: nodes that see the same file race here.
            db.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{fid}/{rel.hex()}",))
            row = db.execute(
                "SELECT id FROM files WHERE folder_id=%s AND rel_path=%s AND size=%s AND mtime_ns=%s",
                (fid, rel, size, mtime_ns),
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
                    (at, old, list(_TERMINAL)),
                )
            new = db.execute(
                "INSERT INTO files (folder_id, rel_path, folder, path, size, mtime_ns, inode, created_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (fid, rel, _b(folder), _b(path), size, mtime_ns, inode, at),
            ).fetchone()
            file_id = int(_got(new)["id"])
            for pipeline, step in jobs:
                db.execute(
                    "INSERT INTO jobs (file_id, pipeline, step, state, next_attempt_at, updated_at) "
                    "VALUES (%s, %s, %s, 'pending', %s, %s)",
                    (file_id, pipeline, step, at, at),
                )
            return file_id, True

        return self._run(go)  # type: ignore[no-any-return]

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
        """Take the most overdue pending job whose lease is free or expired (database clock), leased to ``owner``."""
        at = self._db_time(now)
        mine = "" if self._mine is None else "AND f.folder_id = ANY(%(mine)s) "
        args = {"pipeline": pipeline, "at": at, "owner": owner, "until": at + lease, "mine": self._mine}

        def go(db: psycopg.Connection[Any]) -> dict[str, Any] | None:
            row = db.execute(
                "SELECT j.id FROM jobs j JOIN files f ON f.id=j.file_id WHERE j.pipeline=%(pipeline)s "
                "AND j.state='pending' AND j.next_attempt_at <= %(at)s "
                "AND (j.lease_until IS NULL OR j.lease_until < %(at)s) "
                + _NOT_PAUSED
                + mine
                + "ORDER BY j.next_attempt_at, j.id LIMIT 1 FOR UPDATE OF j SKIP LOCKED",
                args,
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET lease_owner=%(owner)s, lease_until=%(until)s, updated_at=%(at)s WHERE id=%(id)s",
                {**args, "id": row["id"]},
            )
            job: dict[str, Any] = _got(db.execute(_JOB_SELECT + "WHERE j.id=%s", (row["id"],)).fetchone())
            return job

        row = self._run(go)
        if row is None:
            return None
        job = self._job(row)
        job.owner = owner
        return job

    def get_job(self, job_id: int) -> Job | None:
        row = self._one(_JOB_SELECT + "WHERE j.id=%s", (job_id,))
        return self._job(row) if row else None

    def commit(self, job: Job, *, step: str | None = None, **data: Any) -> None:
        """Persist progress on a claimed job (its next step and/or data keys); LeaseLost once it is not ours."""
        if step is not None:
            job.step = step
        job.data.update(data)
        n = self._run(
            lambda db: (
                db.execute(
                    "UPDATE jobs SET step=%s, data=%s, updated_at=%s WHERE id=%s" + _FENCE,
                    (job.step, json.dumps(job.data), self._db_time(), job.id, job.owner),
                ).rowcount
            )
        )
        _fenced(n, job)

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
        assert state in STATES, state
        job.state = state
        if step is not None:
            job.step = step
        if count_attempt:
            job.attempts += 1
        now = self._db_time()
        due = now if next_attempt_at is None else self._db_time(next_attempt_at)
        n = self._run(
            lambda db: (
                db.execute(
                    "UPDATE jobs SET state=%s, step=%s, data=%s, attempts=%s, next_attempt_at=%s, last_error=%s, "
                    "error_code=%s, lease_owner=NULL, lease_until=NULL, updated_at=%s WHERE id=%s" + _FENCE,
                    (
                        job.state,
                        job.step,
                        json.dumps(job.data),
                        job.attempts,
                        due,
                        text(error),
                        error_code,
                        now,
                        job.id,
                        job.owner,
                    ),
                ).rowcount
            )
        )
        _fenced(n, job)
        job.owner = None

    def is_live(self, job: Job) -> bool:
        """True while ``job`` is still held by its claimer and was not superseded (its work still counts)."""
        return self._one("SELECT 1 FROM jobs WHERE id=%s" + _FENCE, (job.id, job.owner)) is not None

    def renew(self, job_ids: Iterable[int], owner: str, *, lease: float = 600.0) -> None:
        """Extend the leases ``owner`` holds on these jobs and on the operations it is sending (database clock)."""
        ids = list(job_ids)
        if not ids:
            return
        until = self._db_time() + lease

        def go(db: psycopg.Connection[Any]) -> None:
            db.execute("UPDATE jobs SET lease_until=%s WHERE lease_owner=%s AND id = ANY(%s)", (until, owner, ids))
            db.execute("UPDATE operations SET lease_until=%s WHERE holder=%s AND state='sending'", (until, owner))

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
        if another node holds it, when that lease runs out (so a dead node's work is taken over on time)."""
        mine = "" if self._mine is None else "AND f.folder_id = ANY(%s) "
        args: tuple[Any, ...] = (pipeline,) + (() if self._mine is None else (self._mine,))
        row = self._one(
            "SELECT MIN(GREATEST(j.next_attempt_at, COALESCE(j.lease_until, 0))) AS due FROM jobs j "
            "JOIN files f ON f.id=j.file_id WHERE j.pipeline=%s AND j.state='pending' " + _NOT_PAUSED + mine,
            args,
        )
        due = None if row is None else row["due"]
        return None if due is None else self._local_time(float(due))

    def pending(self, pipeline: str | None = None, paths: Iterable[str] | None = None) -> int:
        """How many jobs are pending (of one pipeline, for some paths)."""

        def go(db: psycopg.Connection[Any]) -> int:
            sql = "SELECT COUNT(*) AS n FROM jobs j WHERE j.state='pending'"
            args: list[Any] = []
            if pipeline is not None:
                sql += " AND j.pipeline=%s"
                args.append(pipeline)
            if paths is not None:
                sql += " AND j.file_id = ANY(%s)"
                args.append(self._ids_of_paths(db, paths))
            return int(_got(db.execute(sql, args).fetchone())["n"])

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

    def save_result(self, sha256: str, backend: str, result: StoredResult, op: Operation | None = None) -> None:
        """Persist one model's results the moment they arrive; with ``op``, mark it answered in the same transaction."""
        now = self._db_time()

        def go(db: psycopg.Connection[Any]) -> None:
            if op is not None:
                db.execute(
                    "UPDATE operations SET state='answered', holder=NULL, lease_until=NULL, error=NULL, "
                    f"updated_at=%s WHERE {_KEY}",
                    (now, *_key(op)),
                )
            db.execute(
                "INSERT INTO results VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (sha256, backend, requested) "
                "DO UPDATE SET model_name=excluded.model_name, model_version=excluded.model_version, "
                "correlation_id=excluded.correlation_id, results=excluded.results, created_at=excluded.created_at",
                (
                    sha256,
                    backend,
                    result.requested,
                    result.model_name,
                    result.model_version,
                    result.correlation_id,
                    json.dumps(result.results),
                    now,
                ),
            )

        self._run(go)

    # -- the gate (same states as watcher.store.gate) ----------------------------------------------------

    def gate_take(
        self,
        ops: Sequence[Operation],
        owner: str,
        *,
        budget: str,
        seconds: float,
        cap_seconds: float | None = None,
        lease: float = 600.0,
        resend_in_doubt: bool = False,
        now: float | None = None,
    ) -> list[Ticket]:
        """Decide for each operation of one request whether this caller may send it, taking those it may, in one
        transaction: operation rows locked by primary key, the day's spend row locked for the cap check."""
        at = self._db_time(now)
        local_now = self._clock() if now is None else now
        lease = min(lease, self.lease)

        def go(db: psycopg.Connection[Any]) -> list[Ticket]:
            tickets: dict[int, Ticket] = {}
            takeable: list[tuple[int, Operation, bool]] = []
            for op in sorted(ops, key=_key):  # a fixed lock order: no deadlock between two takers
                db.execute(
                    "INSERT INTO operations (sha256, service, operation, params, on_doubt, state, created_at, "
                    "updated_at) VALUES (%s, %s, %s, %s, %s, 'open', %s, %s) ON CONFLICT DO NOTHING",
                    (*_key(op), op.on_doubt, at, at),
                )
            for i, op in enumerate(ops):
                row = _got(db.execute(f"SELECT * FROM operations WHERE {_KEY} FOR UPDATE", _key(op)).fetchone())
                state = row["state"]
                if state == "sending" and (row["lease_until"] or 0) < at:
                    state = "in_doubt" if op.on_doubt == "hold" else "reask"  # its sender died mid-call
                    _set_state(db, op, state, at, error="the daemon stopped while the request was in flight")
                if state == "answered":
                    tickets[i] = Ticket("answered", op, result=row["result"])
                elif state == "sending":
                    tickets[i] = Ticket("wait", op, until=local_now + WAIT_SECONDS, holder=row["holder"])
                elif state == "in_doubt" and not resend_in_doubt:
                    tickets[i] = Ticket("in_doubt", op, since=_opt_local(self, row["since"]), error=row["error"])
                else:
                    takeable.append((i, op, state in ("reask", "in_doubt")))
            if takeable:
                day = utc_day(at)
                db.execute("INSERT INTO spend (day, service) VALUES (%s, %s) ON CONFLICT DO NOTHING", (day, budget))
                spent = _got(
                    db.execute("SELECT * FROM spend WHERE day=%s AND service=%s FOR UPDATE", (day, budget)).fetchone()
                )
                if cap_seconds is not None and spent["seconds"] + seconds > cap_seconds:
                    first = spent["capped_at"] is None
                    if first:
                        db.execute("UPDATE spend SET capped_at=%s WHERE day=%s AND service=%s", (at, day, budget))
                    for i, op, _ in takeable:
                        tickets[i] = Ticket(
                            "capped",
                            op,
                            until=self._local_time(next_utc_midnight(at)),
                            first_cap=first,
                            spent_seconds=spent["seconds"],
                            cap_seconds=cap_seconds,
                        )
                else:
                    request = _got(
                        db.execute(
                            "INSERT INTO ledger (at, day, service, operation, sha256, seconds, models, outcome) "
                            "VALUES (%s, %s, %s, %s, %s, %s, %s, 'sending') RETURNING id",
                            (
                                at,
                                day,
                                budget,
                                ",".join(op.name for _, op, _ in takeable),
                                takeable[0][1].sha256,
                                seconds,
                                sum(op.name.startswith("analyze:") for _, op, _ in takeable),
                            ),
                        ).fetchone()
                    )["id"]
                    db.execute(
                        "UPDATE spend SET seconds=seconds+%s, calls=calls+1 WHERE day=%s AND service=%s",
                        (seconds, day, budget),
                    )
                    for i, op, resend in takeable:
                        db.execute(
                            "UPDATE operations SET state='sending', on_doubt=%s, holder=%s, lease_until=%s, "
                            f"sends=sends+1, error=NULL, since=NULL, updated_at=%s WHERE {_KEY}",
                            (op.on_doubt, owner, at + lease, at, *_key(op)),
                        )
                        tickets[i] = Ticket("send", op, resend=resend, request=int(request))
            return [tickets[i] for i in range(len(ops))]

        return self._run(go)  # type: ignore[no-any-return]

    def gate_answered(self, op: Operation, result: str | None = None) -> None:
        """The service answered: keep its ID so the operation is never sent again, by any node."""
        now = self._db_time()
        self._run(
            lambda db: db.execute(
                "UPDATE operations SET state='answered', result=%s, remote_state=COALESCE(remote_state, 'requested'), "
                f"holder=NULL, lease_until=NULL, error=NULL, since=NULL, updated_at=%s WHERE {_KEY}",
                (result, now, *_key(op)),
            )
        )

    def gate_release(self, op: Operation, state: str, *, error: str | None = None) -> None:
        """No answer: ``open`` (provably not sent), ``reask`` (ask again, counted) or ``in_doubt`` (held)."""
        assert state in ("open", "reask", "in_doubt"), state
        now = self._db_time()
        self._run(lambda db: _set_state(db, op, state, now, error=error))

    def gate_get(self, op: Operation) -> dict[str, Any] | None:
        """The operation's row, or None when never taken (an untaken ``open`` placeholder counts as never)."""
        row = self._one(f"SELECT * FROM operations WHERE {_KEY}", _key(op))
        if row is None or (row["state"] == "open" and row["sends"] == 0):
            return None
        return dict(row)

    def gate_resend(self, ops: Sequence[tuple[str, str, str, str]]) -> int:
        """The user's word: in-doubt operations may be sent again; returns how many."""
        now = self._db_time()

        def go(db: psycopg.Connection[Any]) -> int:
            return sum(
                db.execute(
                    f"UPDATE operations SET state='reask', updated_at=%s WHERE state='in_doubt' AND {_KEY}", (now, *key)
                ).rowcount
                for key in ops
            )

        return int(self._run(go))

    def gate_recover(self, holder: str | None = None) -> int:
        """Operations left ``sending`` (by ``holder``, or by anyone) become in doubt or re-asks."""
        now = self._db_time()
        where = "state='sending'" + (" AND holder=%s" if holder else "")
        args: tuple[Any, ...] = (now, now, *((holder,) if holder else ()))
        return int(
            self._run(
                lambda db: (
                    db.execute(
                        "UPDATE operations SET state=CASE on_doubt WHEN 'hold' THEN 'in_doubt' ELSE 'reask' END, "
                        "since=CASE on_doubt WHEN 'hold' THEN %s ELSE since END, holder=NULL, lease_until=NULL, "
                        f"error='the daemon stopped while the request was in flight', updated_at=%s WHERE {where}",
                        args,
                    ).rowcount
                )
            )
        )

    def ledger_outcome(self, request: int, outcome: str) -> None:
        """Record how a request ended; a request not sent is not spent."""

        def go(db: psycopg.Connection[Any]) -> None:
            row = db.execute("SELECT * FROM ledger WHERE id=%s FOR UPDATE", (request,)).fetchone()
            if row is None or row["outcome"] == outcome:
                return
            db.execute("UPDATE ledger SET outcome=%s WHERE id=%s", (outcome, request))
            if outcome == "not_sent":
                db.execute(
                    "UPDATE spend SET seconds=GREATEST(0, seconds-%s), calls=GREATEST(0, calls-1) "
                    "WHERE day=%s AND service=%s",
                    (row["seconds"], row["day"], row["service"]),
                )

        self._run(go)

    def set_remote_state(self, op: Operation, state: str, error: str | None = None) -> None:
        """What the service last said of the object an answered operation created."""
        now = self._db_time()
        self._run(
            lambda db: db.execute(
                f"UPDATE operations SET remote_state=%s, remote_error=%s, updated_at=%s WHERE {_KEY}",
                (state, text(error), now, *_key(op)),
            )
        )

    def forget_operation(self, op: Operation) -> None:
        """Drop an answered operation whose object the service no longer knows."""
        self._run(lambda db: db.execute(f"DELETE FROM operations WHERE {_KEY}", _key(op)))

    def answered_operations(self, sha256: str, service: str) -> set[str]:
        rows = self._all(
            "SELECT operation FROM operations WHERE sha256=%s AND service=%s AND state='answered'", (sha256, service)
        )
        return {r["operation"] for r in rows}

    def in_doubt_operations(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._all("SELECT * FROM operations WHERE state='in_doubt' ORDER BY since")]

    def spend_on(self, day: str) -> dict[str, dict[str, Any]]:
        rows = self._all("SELECT * FROM spend WHERE day=%s", (day,))
        return {
            r["service"]: {"seconds": r["seconds"], "calls": r["calls"], "capped_at": _opt_local(self, r["capped_at"])}
            for r in rows
        }

    def adopt_legacy(self, old: str, new: str) -> int:
        """Nothing to adopt: this adapter never had keys from before endpoints were part of them."""
        return 0

    # -- control ---------------------------------------------------------------------------------------

    def set_paused(self, folder: str, paused: bool) -> None:
        """Pause or resume a folder for every node (keyed by folder ID)."""
        now = self._db_time()
        self._run(
            lambda db: db.execute(
                "INSERT INTO folder_state (folder_id, folder, paused, updated_at) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (folder_id) DO UPDATE SET paused=excluded.paused, updated_at=excluded.updated_at",
                (self._fid(folder), _b(folder), paused, now),
            )
        )

    def paused_folders(self) -> set[str]:
        rows = self._all("SELECT folder_id, folder FROM folder_state WHERE paused")
        return {self._paths.get(r["folder_id"], os.fsdecode(bytes(r["folder"]))) for r in rows}

    def set_folder_health(self, folder: str, *, mode: str | None, reason: str | None, available: bool) -> None:
        now = self._db_time()
        self._run(
            lambda db: db.execute(
                "INSERT INTO folder_state (folder_id, folder, mode, reason, available, updated_at) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (folder_id) DO UPDATE SET mode=excluded.mode, "
                "reason=excluded.reason, available=excluded.available, updated_at=excluded.updated_at",
                (self._fid(folder), _b(folder), mode, text(reason), available, now),
            )
        )

    def folder_states(self) -> list[dict[str, Any]]:
        rows = self._all("SELECT * FROM folder_state ORDER BY folder")
        return [
            {
                "folder": self._paths.get(r["folder_id"], os.fsdecode(bytes(r["folder"]))),
                "paused": bool(r["paused"]),
                "mode": r["mode"],
                "reason": r["reason"],
                "available": r["available"],
                "updated_at": self._local_time(r["updated_at"]),
            }
            for r in rows
        ]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for row in self._all(
            "SELECT j.pipeline, j.state, COUNT(*) AS n FROM jobs j JOIN files f ON f.id=j.file_id "
            "WHERE f.current GROUP BY j.pipeline, j.state ORDER BY j.pipeline, j.state"
        ):
            out.setdefault(row["pipeline"], {})[row["state"]] = int(row["n"])
        return out

    def problems(self) -> list[Problem]:
        rows = self._all(
            _JOB_SELECT + "WHERE f.current AND (j.state IN ('failed', 'in_doubt') OR (j.last_error IS NOT NULL "
            "AND j.state='pending')) ORDER BY f.folder_id, f.rel_path, j.pipeline"
        )
        out = []
        for r in rows:
            job = self._job(r)
            out.append(
                Problem(
                    path=job.file.path,
                    pipeline=job.pipeline,
                    step=job.step,
                    state=job.state,
                    error_code=job.error_code,
                    error=job.last_error,
                    attempts=job.attempts,
                    next_attempt_at=self._local_time(r["next_attempt_at"]) if job.state == "pending" else None,
                    data=job.data,
                )
            )
        return out

    def jobs_of_file(self, file_id: int) -> list[Job]:
        return [self._job(r) for r in self._all(_JOB_SELECT + "WHERE f.id=%s ORDER BY j.pipeline", (file_id,))]

    def jobs_of_current(self) -> list[Job]:
        rows = self._all(_JOB_SELECT + "WHERE f.current ORDER BY f.folder_id, f.rel_path, j.pipeline")
        return [self._job(r) for r in rows]

    def retry(self, *, paths: Iterable[str] | None = None, failed: bool = False, in_doubt: bool = False) -> int:
        """Make jobs of current versions due now at the step they stopped at (see the SQLite adapter)."""
        now = self._db_time()

        def go(db: psycopg.Connection[Any]) -> int:
            sql = _JOB_SELECT + "WHERE f.current AND j.state IN ('pending', 'failed', 'in_doubt')"
            args: list[Any] = []
            if paths is not None:
                sql += " AND f.id = ANY(%s)"
                args.append(self._ids_of_paths(db, paths))
            changed = 0
            for row in db.execute(sql + " FOR UPDATE OF j", args).fetchall():
                held = row["state"] == "in_doubt"
                if paths is None and not ((failed and row["state"] == "failed") or (in_doubt and held)):
                    continue
                data = json.loads(row["data"])
                for key in (data.pop("in_doubt", None) or {}).get("keys", []) if held else []:
                    db.execute(
                        f"UPDATE operations SET state='reask', updated_at=%s WHERE state='in_doubt' AND {_KEY}",
                        (now, *key),
                    )
                db.execute(
                    "UPDATE jobs SET state='pending', attempts=0, next_attempt_at=%s, last_error=NULL, "
                    "error_code=NULL, data=%s, updated_at=%s WHERE id=%s",
                    (now, json.dumps(data), now, row["id"]),
                )
                changed += 1
            return changed

        return int(self._run(go))

    def prune(self, older_than_days: float, *, now: float | None = None) -> int:
        """Forget replaced or deleted versions whose jobs all ended long ago; results and paid IDs stay."""
        cutoff = self._db_time(now) - older_than_days * 86400

        def go(db: psycopg.Connection[Any]) -> int:
            ids = [
                r["id"]
                for r in db.execute(
                    "SELECT f.id FROM files f WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.file_id=f.id AND "
                    "(j.state <> ALL(%s) OR j.updated_at >= %s)) AND (NOT f.current OR NOT EXISTS "
                    "(SELECT 1 FROM jobs j WHERE j.file_id=f.id AND j.state <> 'gone'))",
                    (list(_TERMINAL), cutoff),
                )
            ]
            if ids:
                db.execute("DELETE FROM jobs WHERE file_id = ANY(%s)", (ids,))
                db.execute("DELETE FROM files WHERE id = ANY(%s)", (ids,))
            return len(ids)

        return int(self._run(go))

    # -- nodes -----------------------------------------------------------------------------------------

    def heartbeat(self, name: str, *, owner: str, version: str, folders: Sequence[str] = ()) -> None:
        """This node is alive: its name, the lease owner it claims as, its version (database clock)."""
        now = self._db_time()
        self._run(
            lambda db: db.execute(
                "INSERT INTO nodes (name, owner, version, started_at, heartbeat_at, folders) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET owner=excluded.owner, "
                "version=excluded.version, heartbeat_at=excluded.heartbeat_at, folders=excluded.folders, "
                "started_at=CASE WHEN nodes.owner=excluded.owner THEN nodes.started_at ELSE excluded.started_at END",
                (name, owner, version, now, now, json.dumps(list(folders))),
            )
        )

    def release_node(self, node: str, keep: str) -> tuple[int, int]:
        """At a node's start: what its earlier lives (owners ``node:...`` other than ``keep``) held is given back
        (jobs) or marked in doubt / to re-ask (operations in flight). (jobs, operations). Node names are unique."""
        now = self._db_time()
        mine = "left({col}, length(%(node)s) + 1) = %(node)s || ':' AND {col} <> %(keep)s"
        args = {"node": node, "keep": keep, "now": now}

        def go(db: psycopg.Connection[Any]) -> tuple[int, int]:
            jobs = db.execute(
                "UPDATE jobs SET lease_owner=NULL, lease_until=NULL WHERE " + mine.format(col="lease_owner"), args
            ).rowcount
            ops = db.execute(
                "UPDATE operations SET state=CASE on_doubt WHEN 'hold' THEN 'in_doubt' ELSE 'reask' END, "
                "since=CASE on_doubt WHEN 'hold' THEN %(now)s ELSE since END, holder=NULL, lease_until=NULL, "
                "error='the daemon stopped while the request was in flight', updated_at=%(now)s "
                "WHERE state='sending' AND " + mine.format(col="holder"),
                args,
            ).rowcount
            return jobs, ops

        return self._run(go)  # type: ignore[no-any-return]

    def nodes(self) -> list[dict[str, Any]]:
        """Every node that ever used this store: name, version, last heartbeat (this node's clock), jobs held."""
        at = self._db_time()
        rows = self._all(
            "SELECT n.*, (SELECT COUNT(*) FROM jobs j WHERE j.lease_owner=n.owner AND j.lease_until >= %s) AS held "
            "FROM nodes n ORDER BY n.name",
            (at,),
        )
        return [
            {
                "name": r["name"],
                "version": r["version"],
                "last_heartbeat": self._local_time(r["heartbeat_at"]),
                "seconds_since_heartbeat": round(max(0.0, at - r["heartbeat_at"]), 1),
                "jobs_held": int(r["held"]),
                "owner": r["owner"],
            }
            for r in rows
        ]


class _Pool:
    """A small pool of psycopg connections: at most ``size`` in use at once, idle ones reused, broken ones dropped
    and replaced on the next use (a fresh connect, bounded by ``connect_timeout``, never a wait on a background
    reconnect: what a partition needs)."""

    def __init__(self, url: str, kwargs: dict[str, Any], size: int) -> None:
        self._url = url
        self._kwargs = kwargs
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()

    def check(self) -> None:
        """Open one connection now (so a wrong URL or password is reported at start)."""
        with self.connection() as conn:
            conn.execute("SELECT 1")

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._slots:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = psycopg.connect(self._url, **self._kwargs)
            try:
                yield conn
            finally:
                if conn.closed or conn.broken:
                    conn.close()
                else:
                    with self._lock:
                        self._idle.append(conn)

    def drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        self.drop_idle()


def _got(row: Any) -> Any:
    """A row a statement always returns (RETURNING, a row locked just after its insert)."""
    assert row is not None
    return row


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _set_state(db: psycopg.Connection[Any], op: Operation, state: str, now: float, *, error: str | None) -> None:
    db.execute(
        "UPDATE operations SET state=%s, holder=NULL, lease_until=NULL, error=%s, updated_at=%s, "
        f"since=CASE WHEN %s='in_doubt' THEN %s ELSE since END WHERE {_KEY}",
        (state, text(error), now, state, now, *_key(op)),
    )


def _opt_local(store: PostgresStore, t: float | None) -> float | None:
    return None if t is None else store._local_time(t)


def _fenced(rowcount: int, job: Job) -> None:
    if rowcount == 0:
        raise LeaseLost(
            f"job {job.id} ({job.pipeline}) was superseded or its lease was lost; its result is not recorded"
        )
