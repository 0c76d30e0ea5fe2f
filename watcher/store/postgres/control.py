"""Control and reporting in PostgreSQL: pause, folder health, counts, problems, retry, prune, nodes."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from watcher.errors import ConfigError
from watcher.names import text
from watcher.store.models import Job, Operation, Problem, RetryAsk, State, Step
from watcher.store.postgres.base import adopt_late, path_bytes
from watcher.store.postgres.schema import (
    JOB_SELECT,
    KEY_WHERE,
    NODE_ALIVE_SECONDS,
    NOW,
    TERMINAL_STATES,
)
from watcher.store.rules import AFTER_CRASH_ERROR_SQL, AFTER_CRASH_SQL, below, path_order, utc_day

if TYPE_CHECKING:
    from watcher.store.postgres.base import PgBase as _Base
else:
    _Base = object


class PgControlMixin(_Base):
    """Control, reporting and the nodes table."""

    # -- control ---------------------------------------------------------------------------------------

    def set_paused(self, folder: str, *, paused: bool) -> None:
        """Pause or resume a folder for every node (keyed by folder ID)."""
        self._run(
            lambda db: db.execute(
                f"INSERT INTO folder_state (folder_id, folder, paused, updated_at) VALUES (%s, %s, %s, {NOW}) "
                "ON CONFLICT (folder_id) DO UPDATE SET paused=excluded.paused, updated_at=excluded.updated_at",
                (self._fid(folder), path_bytes(folder), paused),
            )
        )

    def paused_folders(self) -> set[str]:
        rows = self._all("SELECT folder_id, folder FROM folder_state WHERE paused")
        return {self._paths.get(r["folder_id"], os.fsdecode(bytes(r["folder"]))) for r in rows}

    def set_folder_health(self, folder: str, *, mode: str | None, reason: str | None, available: bool) -> None:
        self._run(
            lambda db: db.execute(
                "INSERT INTO folder_state (folder_id, folder, mode, reason, available, updated_at) "
                f"VALUES (%s, %s, %s, %s, %s, {NOW}) ON CONFLICT (folder_id) DO UPDATE SET mode=excluded.mode, "
                "reason=excluded.reason, available=excluded.available, updated_at=excluded.updated_at",
                (self._fid(folder), path_bytes(folder), mode, text(reason), available),
            )
        )

    def folder_states(self) -> list[dict[str, Any]]:
        rows = self._all("SELECT * FROM folder_state ORDER BY folder")
        offset = self._offset() if rows else 0.0
        return [
            {
                "folder": self._paths.get(r["folder_id"], os.fsdecode(bytes(r["folder"]))),
                "paused": bool(r["paused"]),
                "mode": r["mode"],
                "reason": r["reason"],
                "available": r["available"],
                "updated_at": r["updated_at"] - offset,
            }
            for r in rows
        ]

    def problems(self, limit: int | None = None) -> list[Problem]:
        """Current revisions whose jobs failed, are held or wait to retry after an error (the first ``limit``)."""
        rows = self._all(
            JOB_SELECT + "WHERE f.current AND (j.state IN ('failed', 'in_doubt') OR (j.last_error IS NOT NULL "
            "AND j.state='pending')) ORDER BY f.folder_id, f.rel_path, j.pipeline LIMIT %s",
            (limit,),
        )
        out = []
        offset = self._offset() if rows else 0.0
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
                    next_attempt_at=r["next_attempt_at"] - offset if job.state == State.PENDING else None,
                    data=job.data,
                )
            )
        return out

    def jobs_of_file(self, file_id: int) -> list[Job]:
        return [self._job(r) for r in self._all(JOB_SELECT + "WHERE f.id=%s ORDER BY j.pipeline", (file_id,))]

    def jobs_of_current(self) -> list[Job]:
        rows = self._all(JOB_SELECT + "WHERE f.current ORDER BY f.folder_id, f.rel_path, j.pipeline")
        return [self._job(r) for r in rows]

    def jobs_under(self, paths: Sequence[str]) -> list[Job]:
        """The jobs of the current revisions at or under ``paths`` (see the SQLite adapter), each part an indexed
        range: in this node's folders by folder ID and relative path (``files_current``), in the folders of other
        nodes only by the path they recorded (``files_by_path``)."""
        mine = sorted(set(self._folders.values()))
        rows = [r for p in paths for sql, args in self._under(p, mine) for r in self._all(JOB_SELECT + sql, args)]
        return path_order(self._job(r) for r in rows)

    def _under(self, path: str, mine: list[str]) -> list[tuple[str, tuple[Any, ...]]]:
        """WHERE clauses (and their arguments) that together find the current revisions at or under ``path``."""
        path = os.path.normpath(path)  # "/w/" is the folder "/w" (its relative path is not ".")
        low, high = below(path)
        others = "WHERE f.current AND NOT (f.folder_id = ANY(%s)) AND "
        out: list[tuple[str, tuple[Any, ...]]] = [
            (others + "f.path=%s", (mine, path_bytes(path))),
            (others + "f.path>=%s AND f.path<%s", (mine, low, high)),
        ]
        inside = path.rstrip("/") + "/"
        for folder, fid in self._folders.items():
            if folder == path or folder.startswith(inside):  # the whole folder
                out.append(("WHERE f.current AND f.folder_id=%s", (fid,)))
            elif path.startswith(folder.rstrip("/") + "/"):  # a file or a folder inside it
                rel = os.path.relpath(path, folder)
                here = "WHERE f.current AND f.folder_id=%s AND f.rel_path"
                out.append((here + "=%s", (fid, path_bytes(rel))))
                out.append((here + ">=%s AND f.rel_path<%s", (fid, *below(rel))))
        return out

    def current_jobs_after(self, file_id: int, files: int) -> list[Job]:
        """A page of current revisions' jobs, in file ID order (see the SQLite adapter). The lateral probe keeps the
        plan a walk of the files' key from ``file_id`` (an EXISTS may become a merge join from the jobs' start)."""
        rows = self._all(
            JOB_SELECT + "WHERE f.id IN (SELECT fi.id FROM files fi, LATERAL (SELECT 1 FROM jobs WHERE file_id = fi.id "
            "LIMIT 1) AS has WHERE fi.current AND fi.id > %s ORDER BY fi.id LIMIT %s) ORDER BY f.id, j.pipeline",
            (file_id, files),
        )
        return [self._job(r) for r in rows]

    def retry(
        self,
        *,
        paths: Iterable[str] | None = None,
        failed: bool = False,
        in_doubt: bool = False,
        waiting_on_service: bool = False,
        pipelines: Sequence[str] | None = None,
    ) -> int:
        """Make jobs of current revisions due now at the step they stopped at (see the SQLite adapter)."""
        ask = RetryAsk(
            by_path=paths is not None,
            failed=failed,
            in_doubt=in_doubt,
            waiting_on_service=waiting_on_service,
            pipelines=pipelines,
        )

        def go(db: psycopg.Connection[Any]) -> int:
            now = self._now(db)
            sql = JOB_SELECT + "WHERE f.current AND j.state IN ('pending', 'failed', 'in_doubt')"
            args: list[Any] = []
            if paths is not None:
                sql += " AND f.id = ANY(%s)"
                args.append(self._ids_of_paths(db, paths))
            narrow, narrow_args = ask.narrowing("%s")
            changed = 0
            for row in db.execute(sql + narrow + " FOR UPDATE OF j", [*args, *narrow_args]).fetchall():
                if not ask.takes(row["state"], row["error_code"], row["pipeline"]):
                    continue
                data, held = RetryAsk.release(row["state"], row["data"])
                for key in held:
                    db.execute(
                        f"UPDATE operations SET state='reask', updated_at=%s WHERE state='in_doubt' AND {KEY_WHERE}",
                        (now, *key),
                    )
                db.execute(
                    "UPDATE jobs SET state='pending', attempts=0, next_attempt_at=%s, last_error=NULL, "
                    "error_code=NULL, data=%s, updated_at=%s WHERE id=%s",
                    (now, data, now, row["id"]),
                )
                changed += 1
            return changed

        return int(self._run(go))

    def wake_capped(self) -> int:
        """Make every pending job a daily cap deferred due now, and clear today's cap marks (see the SQLite
        adapter); the day is the database's."""

        def go(db: psycopg.Connection[Any]) -> int:
            now = self._now(db)
            db.execute("UPDATE spend SET capped_at=NULL WHERE day=%s AND capped_at IS NOT NULL", (utc_day(now),))
            cur = db.execute(
                "UPDATE jobs SET next_attempt_at=%s, last_error=NULL, error_code=NULL, updated_at=%s "
                "WHERE state='pending' AND error_code='capped' AND lease_owner IS NULL",
                (now, now),
            )
            return int(cur.rowcount)

        return int(self._run(go))

    def add_jobs(self, file_ids: Sequence[int], pipeline: str, step: Step) -> int:
        """Queue ``pipeline`` at ``step`` for revisions that have no job of it yet (see the SQLite adapter)."""

        def go(db: psycopg.Connection[Any]) -> int:
            now = self._now(db)
            added = 0
            for file_id in file_ids:
                cur = db.execute(
                    "INSERT INTO jobs (file_id, pipeline, step, state, next_attempt_at, updated_at) "
                    "SELECT %s, %s, %s, 'pending', %s, %s WHERE NOT EXISTS "
                    "(SELECT 1 FROM jobs WHERE file_id=%s AND pipeline=%s)",
                    (file_id, pipeline, step, now, now, file_id, pipeline),
                )
                added += cur.rowcount
            return added

        return int(self._run(go))

    def reopen(self, job_ids: Sequence[int], step: Step) -> int:
        """Make ``done`` jobs pending again at ``step`` (see the SQLite adapter)."""

        def go(db: psycopg.Connection[Any]) -> int:
            now = self._now(db)
            changed = 0
            for job_id in job_ids:
                cur = db.execute(
                    "UPDATE jobs SET state='pending', step=%s, attempts=0, next_attempt_at=%s, last_error=NULL, "
                    "error_code=NULL, updated_at=%s WHERE id=%s AND state='done'",
                    (step, now, now, job_id),
                )
                changed += cur.rowcount
            return changed

        return int(self._run(go))

    def promote(self, job_ids: Sequence[int]) -> int:
        """Rank the pending jobs among ``job_ids`` as live; how many files had a job moved (see the SQLite adapter)."""

        def go(db: psycopg.Connection[Any]) -> int:
            rows = db.execute(
                "UPDATE jobs SET live=1 WHERE id = ANY(%s) AND state='pending' AND live=0 RETURNING file_id",
                (list(job_ids),),
            ).fetchall()
            return len({int(r["file_id"]) for r in rows})

        return int(self._run(go))

    def prune(self, older_than_days: float, *, now: float | None = None) -> int:
        """Forget replaced or deleted revisions whose jobs all ended long ago; results and paid IDs stay. Only
        replaced revisions created before the cutoff and those with a job ``gone`` are read (``files_replaced``,
        ``jobs_gone``)."""

        def go(db: psycopg.Connection[Any]) -> int:
            cutoff = (self._now(db) if now is None else now) - older_than_days * 86400  # ``now``: tests only
            ids = [
                r["id"]
                for r in db.execute(
                    "SELECT f.id FROM files f WHERE f.id IN (SELECT id FROM files WHERE NOT current "
                    "AND created_at < %s UNION SELECT file_id FROM jobs WHERE state='gone') "
                    "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.file_id=f.id AND "
                    "(j.state <> ALL(%s) OR j.updated_at >= %s)) AND (NOT f.current OR NOT EXISTS "
                    "(SELECT 1 FROM jobs j WHERE j.file_id=f.id AND j.state <> 'gone'))",
                    (cutoff, list(TERMINAL_STATES), cutoff),
                )
            ]
            if ids:
                db.execute("DELETE FROM jobs WHERE file_id = ANY(%s)", (ids,))
                db.execute("DELETE FROM files WHERE id = ANY(%s)", (ids,))
            return len(ids)

        return int(self._run(go))

    # -- nodes -----------------------------------------------------------------------------------------

    def claim_node_name(self, name: str, node_id: str) -> None:
        """At a node's start: ``name`` is this node's (``node_id``, generated and kept in its state folder). Refused
        (ConfigError: exit 2, which its supervisor does not retry) while another node with a live heartbeat
        answers to that name; a dead one's name is taken over (its leases are left to expire, never released)."""

        def go(db: psycopg.Connection[Any]) -> dict[str, Any] | None:
            db.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))", (f"node-name/{name}",))
            row = db.execute(
                f"SELECT node_id, heartbeat_at, {NOW} - heartbeat_at AS ago FROM nodes WHERE name=%s", (name,)
            ).fetchone()
            if row is not None and row["node_id"] not in (None, node_id) and row["ago"] < NODE_ALIVE_SECONDS:
                return dict(row)
            db.execute(
                "INSERT INTO nodes (name, owner, version, started_at, heartbeat_at, node_id) "
                f"VALUES (%s, '', '', {NOW}, {NOW}, %s) ON CONFLICT (name) DO UPDATE SET node_id=excluded.node_id",
                (name, node_id),
            )
            return None

        taken = self._run(go)
        if taken is not None:
            when = dt.datetime.fromtimestamp(self._local_time(taken["heartbeat_at"]), dt.UTC)
            raise ConfigError(
                f"[store] node_name {name!r} belongs to another node (ID {taken['node_id']}) whose last heartbeat "
                f"was {when.isoformat(timespec='seconds').replace('+00:00', 'Z')} ({taken['ago']:.0f} s ago): "
                "not starting, so that neither node takes the other's work; give this machine its own node_name "
                "(a cloned machine: also remove its state folder's node-id)"
            )

    def heartbeat(self, name: str, *, holder: str, version: str, folders: Sequence[str] = ()) -> None:
        """This node is alive: its name, the lease holder it claims as, its version (database clock)."""
        self._run(
            lambda db: db.execute(
                "INSERT INTO nodes (name, owner, version, started_at, heartbeat_at, folders) "
                f"VALUES (%s, %s, %s, {NOW}, {NOW}, %s) ON CONFLICT (name) DO UPDATE SET owner=excluded.owner, "
                "version=excluded.version, heartbeat_at=excluded.heartbeat_at, folders=excluded.folders, "
                "started_at=CASE WHEN nodes.owner=excluded.owner THEN nodes.started_at ELSE excluded.started_at END",
                (name, holder, version, json.dumps(list(folders))),
            )
        )

    def release_node(self, node_id: str, keep: str) -> tuple[int, int]:
        """At a node's start: what its earlier lives held (holders ending ``@<node_id>``, exactly that ID, other than
        ``keep``) is given back (jobs) or marked in doubt / to re-ask (operations in flight). (jobs, operations).
        Another node's leases are never touched, whatever its name."""
        mine = "split_part({col}, '@', -1) = %(node)s AND {col} <> %(keep)s"
        args = {"node": node_id, "keep": keep}

        def go(db: psycopg.Connection[Any]) -> tuple[int, int]:
            jobs = db.execute(
                "UPDATE jobs SET lease_owner=NULL, lease_until=NULL WHERE lease_owner IS NOT NULL AND "
                + mine.format(col="lease_owner"),
                args,
            ).rowcount
            ops = db.execute(
                f"UPDATE operations SET state={AFTER_CRASH_SQL}, error={AFTER_CRASH_ERROR_SQL}, "
                f"since=CASE {AFTER_CRASH_SQL} WHEN 'in_doubt' THEN {NOW} ELSE since END, holder=NULL, "
                f"lease_until=NULL, updated_at={NOW} WHERE state='sending' AND "
                + mine.format(col="holder")
                + " RETURNING sha256, service, operation, params, late_result",
                args,
            ).fetchall()
            for r in ops:  # a late answer kept beside one of them answers it
                if r["late_result"] is not None:
                    adopt_late(db, Operation(r["sha256"], r["service"], r["operation"], r["params"]))
            return jobs, len(ops)

        return self._run(go)

    def node_alive(self, node_id: str) -> bool:
        """True while a node with this ID has a live heartbeat (its temp files are its own business)."""
        row = self._one(
            f"SELECT 1 FROM nodes WHERE node_id=%s AND {NOW} - heartbeat_at < %s", (node_id, NODE_ALIVE_SECONDS)
        )
        return row is not None

    def nodes(self) -> list[dict[str, Any]]:
        """Every node that ever used this store: name, version, last heartbeat (this node's clock), jobs held."""
        rows = self._all(
            f"SELECT n.*, {NOW} - n.heartbeat_at AS ago, (SELECT COUNT(*) FROM jobs j WHERE j.lease_owner=n.owner "
            f"AND j.lease_until >= {NOW}) AS held FROM nodes n ORDER BY n.name"
        )
        now = self._clock()
        return [
            {
                "name": r["name"],
                "version": r["version"],
                "last_heartbeat": now - r["ago"],
                "seconds_since_heartbeat": round(max(0.0, r["ago"]), 1),
                "jobs_held": int(r["held"]),
                "owner": r["owner"],
            }
            for r in rows
        ]
