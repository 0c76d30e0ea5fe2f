"""What the page, its API and `watcher status` read from the PostgreSQL store, at any size: counts kept by
triggers in per-session slots (summed here, never recounted), the backlog's recent pace, and pages of current
files found through indexes (as :mod:`watcher.store.sqlite.listing` does for SQLite)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from watcher.store.models import STATES, FileQuery, Listed
from watcher.store.postgres.schema import JOB_SELECT
from watcher.store.rules import COUNT_CAP, OPEN, by_state

if TYPE_CHECKING:
    from watcher.store.postgres.base import PgBase

    _Base = PgBase
else:
    _Base = object


class PgListingMixin(_Base):
    """Counts, pace and file pages of the PostgreSQL store."""

    def counts(self) -> dict[str, dict[str, int]]:
        """Jobs of the current revisions per pipeline and state: the slots the triggers keep, summed."""
        rows = self._all("SELECT pipeline, state, SUM(n) AS n FROM job_counts GROUP BY pipeline, state")
        return by_state({(r["pipeline"], r["state"]): int(r["n"]) for r in rows})

    def open_counts(self) -> dict[str, dict[str, int]]:
        """Like :meth:`counts`, for the states still open only (pending, in_doubt, failed)."""
        return {p: {s: n for s, n in states.items() if s in OPEN} for p, states in self.counts().items()}

    def folder_counts(self) -> dict[str, int]:
        """Current revisions per folder (this node's path for its folders, else the folder ID)."""
        rows = self._all("SELECT folder_id, SUM(n) AS n FROM folder_counts GROUP BY folder_id HAVING SUM(n) > 0")
        return {self._paths.get(r["folder_id"], r["folder_id"]): int(r["n"]) for r in rows}

    def finished_since(self, since: float) -> dict[str, int]:
        """Jobs per pipeline that left the backlog (done, failed, skipped) since ``since`` (this node's clock),
        read in the ``jobs_finished`` index."""
        rows = self._all(
            "SELECT pipeline, COUNT(*) AS n FROM jobs WHERE state IN ('done', 'failed', 'skipped') "
            "AND updated_at >= %s GROUP BY pipeline",
            (since - self._offset(),),
        )
        return {"analyze": 0, "archive": 0} | {r["pipeline"]: int(r["n"]) for r in rows}

    def spent_since(self, since: float) -> dict[str, float]:
        """Audio seconds the ledger took per budget (``analysis``, ``processing``) since ``since`` (this node's
        clock)."""
        rows = self._all(
            "SELECT service, SUM(seconds) AS s FROM ledger WHERE service IN ('analysis', 'processing') AND at >= %s "
            "GROUP BY service",
            (since - self._offset(),),
        )
        return {"analysis": 0.0, "processing": 0.0} | {r["service"]: float(r["s"]) for r in rows}

    def open_files(self, limit: int) -> list[Listed]:
        """Up to ``limit`` current files with a job still open (pending, held, failed), in path order."""
        rows = self._all(
            "SELECT DISTINCT j.file_id FROM jobs j JOIN files f ON f.id=j.file_id WHERE f.current "
            "AND j.state IN ('pending', 'in_doubt', 'failed') LIMIT %s",
            (limit,),
        )
        return sorted(self._listed([int(r["file_id"]) for r in rows]), key=lambda e: e.file.path)

    def list_files(self, query: FileQuery) -> tuple[list[Listed], int, bool]:
        """One page of current files in path order, the total that match and whether it was capped."""
        where, args = self._filters(query)
        order = "f.bpm, f.path" if query.bpm_min is not None or query.bpm_max is not None else "f.path"
        ids = [
            int(r["id"])
            for r in self._all(
                f"SELECT f.id FROM files f WHERE {where} ORDER BY {order} LIMIT %s OFFSET %s",
                (*args, query.size, (query.page - 1) * query.size),
            )
        ]
        if not query.filtered:
            counted = self.folder_counts()
            total = counted.get(query.folder, 0) if query.folder else sum(counted.values())
            return self._listed(ids), total, False
        row = self._one(
            f"SELECT COUNT(*) AS n FROM (SELECT 1 FROM files f WHERE {where} LIMIT {COUNT_CAP + 1}) c", args
        )
        total = int(row["n"]) if row else 0
        return self._listed(ids), min(total, COUNT_CAP), total > COUNT_CAP

    def _filters(self, query: FileQuery) -> tuple[str, list[Any]]:
        """The WHERE clause over ``files f`` and its arguments."""
        where: list[str] = ["f.current"]
        args: list[Any] = []
        if query.folder:
            where.append("f.folder_id=%s")
            args.append(self._fid(query.folder))
        if query.key:
            where.append("f.music_key=%s")
            args.append(query.key)
            if query.scale:
                where.append("f.music_scale=%s")
                args.append(query.scale)
        if query.bpm_min is not None or query.bpm_max is not None:
            where.append("f.bpm BETWEEN %s AND %s")
            args += [query.bpm_min if query.bpm_min is not None else -1e9, query.bpm_max or 1e9]
        if query.text:
            where.append("position(%s::bytea in f.path) > 0")  # the name's bytes as typed (case counts here)
            args.append(query.text.encode())
        if query.state in STATES:
            where.append("EXISTS (SELECT 1 FROM jobs j WHERE j.file_id=f.id AND j.state=%s)")
            args.append(query.state)
        elif query.state:
            where.append("false")
        return " AND ".join(where), args

    def listed(self, path: str) -> Listed | None:
        """One current file by its path, with its jobs: one indexed lookup."""
        where, args = self._where_path(path)
        row = self._one(f"SELECT id FROM files WHERE {where} AND current ORDER BY id DESC LIMIT 1", args)
        found = self._listed([int(row["id"])]) if row else []
        return found[0] if found else None

    def _listed(self, ids: list[int]) -> list[Listed]:
        """The files ``ids`` (in that order) with their jobs and tags."""
        if not ids:
            return []
        rows = self._all(
            JOB_SELECT.replace("f.current", "f.current, f.music_key, f.music_scale, f.bpm")
            + "WHERE f.id = ANY(%s) ORDER BY j.pipeline",
            (ids,),
        )
        bare = self._all("SELECT id AS fid, *, NULL AS pipeline FROM files WHERE id = ANY(%s)", (ids,))
        out: dict[int, Listed] = {}
        for r in [*rows, *bare]:
            fid = int(r["fid"])
            if fid not in out:
                out[fid] = Listed(self._revision(r), r["music_key"], r["music_scale"], r["bpm"])
            if r["pipeline"] is not None:
                out[fid].jobs.append(self._job(r))
        return [out[i] for i in ids if i in out]
