"""The PostgreSQL store's foundation: connection, transactions, migrations, clocks, folder IDs, rows to
revisions and jobs, and the operation writes the gate and the cache share."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row

from watcher.names import text
from watcher.store.lanes import ClaimOrder
from watcher.store.models import Fence, FileRevision, Job, Operation
from watcher.store.ports import StoreUnavailable
from watcher.store.postgres.pool import CONNECT_SECONDS, Pool, StoreUnreachable, first_line, redact
from watcher.store.postgres.schema import (
    KEY_WHERE,
    LOCK_KEY,
    NOW,
    OP_FENCED,
    OP_UNHELD,
    SCHEMA,
)
from watcher.store.rules import StoreTooNew, fence_args, job_of, op_key, too_new

T = TypeVar("T")


def path_bytes(path: str) -> bytes:
    """A path as the store keeps it: its exact bytes."""
    return os.fsencode(path)


class PgBase:
    """Connection, clocks and folder IDs: what the other parts (jobs, cache, gate, listing, control) build on."""

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
        twice: every caller is idempotent or fenced (a second claim by the same holder, a take that then waits on
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

    def _revision(self, row: dict[str, Any]) -> FileRevision:
        rel = os.fsdecode(bytes(row["rel_path"]))
        local = self._paths.get(row["folder_id"])
        if local is not None:
            folder, path = local, os.path.join(local, rel)
        else:
            folder, path = os.fsdecode(bytes(row["folder"])), os.fsdecode(bytes(row["path"]))
        return FileRevision(
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
        job = job_of(row, self._revision(row))
        job.seen_holder = row.get("lease_owner") if row.get("lease_until") else None
        return job


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

