"""Control and reporting in PostgreSQL: pause, folder health, counts, problems, retry, prune, nodes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from watcher.names import text
from watcher.store.models import Job, Problem, retry_selects
from watcher.store.postgres.base import path_bytes
from watcher.store.postgres.schema import (
    JOB_SELECT,
    KEY_WHERE,
    TERMINAL_STATES,
)
from watcher.store.schema import OPEN_STATES

if TYPE_CHECKING:
    from watcher.store.postgres.base import PgBase as _Base
else:
    _Base = object


class PgControlMixin(_Base):
    """Control, reporting and the nodes table."""

    # -- control ---------------------------------------------------------------------------------------

    def set_paused(self, folder: str, paused: bool) -> None:
        """Pause or resume a folder for every node (keyed by folder ID)."""
        now = self._db_time()
        self._run(
            lambda db: db.execute(
                "INSERT INTO folder_state (folder_id, folder, paused, updated_at) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (folder_id) DO UPDATE SET paused=excluded.paused, updated_at=excluded.updated_at",
                (self._fid(folder), path_bytes(folder), paused, now),
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
                (self._fid(folder), path_bytes(folder), mode, text(reason), available, now),
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

    def open_counts(self) -> dict[str, dict[str, int]]:
        """Like :meth:`counts`, for the open states only, read through the ``jobs_open`` index (the heartbeat)."""
        out: dict[str, dict[str, int]] = {}
        for row in self._all(
            "SELECT j.pipeline, j.state, COUNT(*) AS n FROM jobs j JOIN files f ON f.id=j.file_id "
            "WHERE " + OPEN_STATES + " AND f.current GROUP BY j.pipeline, j.state ORDER BY j.pipeline, j.state"
        ):
            out.setdefault(row["pipeline"], {})[row["state"]] = int(row["n"])
        return out

    def problems(self) -> list[Problem]:
        rows = self._all(
            JOB_SELECT + "WHERE f.current AND (j.state IN ('failed', 'in_doubt') OR (j.last_error IS NOT NULL "
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
        return [self._job(r) for r in self._all(JOB_SELECT + "WHERE f.id=%s ORDER BY j.pipeline", (file_id,))]

    def jobs_of_current(self) -> list[Job]:
        rows = self._all(JOB_SELECT + "WHERE f.current ORDER BY f.folder_id, f.rel_path, j.pipeline")
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
        """Make jobs of current versions due now at the step they stopped at (see the SQLite adapter)."""
        now = self._db_time()

        def go(db: psycopg.Connection[Any]) -> int:
            sql = JOB_SELECT + "WHERE f.current AND j.state IN ('pending', 'failed', 'in_doubt')"
            args: list[Any] = []
            if paths is not None:
                sql += " AND f.id = ANY(%s)"
                args.append(self._ids_of_paths(db, paths))
            changed = 0
            for row in db.execute(sql + " FOR UPDATE OF j", args).fetchall():
                held = row["state"] == "in_doubt"
                if not retry_selects(
                    row["state"],
                    row["error_code"],
                    row["pipeline"],
                    by_path=paths is not None,
                    failed=failed,
                    in_doubt=in_doubt,
                    waiting_on_service=waiting_on_service,
                    pipelines=pipelines,
                ):
                    continue
                data = json.loads(row["data"])
                for key in (data.pop("in_doubt", None) or {}).get("keys", []) if held else []:
                    db.execute(
                        f"UPDATE operations SET state='reask', updated_at=%s WHERE state='in_doubt' AND {KEY_WHERE}",
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

    def add_jobs(self, file_ids: Sequence[int], pipeline: str, step: str) -> int:
        """Queue ``pipeline`` at ``step`` for versions that have no job of it yet (see the SQLite adapter)."""
        now = self._db_time()

        def go(db: psycopg.Connection[Any]) -> int:
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

    def reopen(self, job_ids: Sequence[int], step: str) -> int:
        """Make ``done`` jobs pending again at ``step`` (see the SQLite adapter)."""
        now = self._db_time()

        def go(db: psycopg.Connection[Any]) -> int:
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

    def prune(self, older_than_days: float, *, now: float | None = None) -> int:
        """Forget replaced or deleted versions whose jobs all ended long ago; results and paid IDs stay. Only
        replaced versions and those with a job ``gone`` are read (``files_replaced``, ``jobs_gone``)."""
        cutoff = self._db_time(now) - older_than_days * 86400

        def go(db: psycopg.Connection[Any]) -> int:
            ids = [
                r["id"]
                for r in db.execute(
                    "SELECT f.id FROM files f WHERE f.id IN (SELECT id FROM files WHERE NOT current "
                    "UNION SELECT file_id FROM jobs WHERE state='gone') "
                    "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.file_id=f.id AND "
                    "(j.state <> ALL(%s) OR j.updated_at >= %s)) AND (NOT f.current OR NOT EXISTS "
                    "(SELECT 1 FROM jobs j WHERE j.file_id=f.id AND j.state <> 'gone'))",
                    (list(TERMINAL_STATES), cutoff),
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
