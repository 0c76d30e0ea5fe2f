"""What the page, its API and `watcher status` read from the SQLite store, at any size: counts kept by triggers
(never recounted), the backlog's recent pace, and pages of current files found through indexes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from watcher.names import from_db, to_db
from watcher.store.models import _JOB_SELECT, STATES, FileQuery, Listed, _revision
from watcher.store.rules import COUNT_CAP, OPEN, by_state

if TYPE_CHECKING:
    from watcher.store.sqlite.core import StoreBase

    _Base = StoreBase
else:
    _Base = object

def _order(query: FileQuery) -> str:
    """Path order; newest first for an open state (failed, held, pending), by tempo (then path) for a tempo
    range: each the order of the index that query reads."""
    if query.state in OPEN:
        return "j.file_id DESC"
    if query.bpm_min is not None or query.bpm_max is not None:
        return "f.bpm, f.path"
    return "f.path"


class ListingMixin(_Base):
    """Counts, pace and file pages of the SQLite store."""

    def counts(self) -> dict[str, dict[str, int]]:
        """Jobs of the current revisions per pipeline and state: the rows the triggers keep."""
        with self._lock:
            rows = self._db.execute("SELECT pipeline, state, n FROM job_counts").fetchall()
        return by_state({(r[0], r[1]): r[2] for r in rows})

    def open_counts(self) -> dict[str, dict[str, int]]:
        """Like :meth:`counts`, for the states still open only (pending, in_doubt, failed)."""
        return {p: {s: n for s, n in states.items() if s in OPEN} for p, states in self.counts().items()}

    def folder_counts(self) -> dict[str, int]:
        """Current revisions per folder, as the triggers keep them."""
        with self._lock:
            rows = self._db.execute("SELECT folder, n FROM folder_counts WHERE n > 0").fetchall()
        return {from_db(r[0]): int(r[1]) for r in rows}

    def finished_since(self, since: float) -> dict[str, int]:
        """Jobs per pipeline that left the backlog (done, failed, skipped) since ``since``: read in the
        ``jobs_finished`` index, so it costs what finished in that window."""
        out: dict[str, int] = {}
        with self._lock:
            for pipeline in ("analyze", "archive"):
                row = self._db.execute(
                    "SELECT COUNT(*) FROM jobs INDEXED BY jobs_finished WHERE pipeline=? "
                    "AND state IN ('done', 'failed', 'skipped') AND updated_at >= ?",
                    (pipeline, since),
                ).fetchone()
                out[pipeline] = int(row[0])
        return out

    def spent_since(self, since: float) -> dict[str, float]:
        """Audio seconds the ledger took per budget (``analysis``, ``processing``) since ``since``."""
        with self._lock:
            return {
                budget: float(
                    self._db.execute(
                        "SELECT COALESCE(SUM(seconds), 0) FROM ledger WHERE service=? AND at >= ?", (budget, since)
                    ).fetchone()[0]
                )
                for budget in ("analysis", "processing")
            }

    def open_files(self, limit: int) -> list[Listed]:
        """Up to ``limit`` current files with a job still open (pending, held, failed), in path order; found
        through the ``jobs_open`` index, so finished files are not read."""
        with self._lock:
            ids = [
                r[0]
                for r in self._db.execute(
                    "SELECT DISTINCT j.file_id FROM jobs j WHERE j.state IN ('pending', 'in_doubt', 'failed') "
                    "AND EXISTS (SELECT 1 FROM files f WHERE f.id=j.file_id AND f.current=1) LIMIT ?",
                    (limit,),
                )
            ]
        return sorted(self._listed(ids), key=lambda e: e.file.path)

    def list_files(self, query: FileQuery) -> tuple[list[Listed], int, bool]:
        """One page of current files in path order, the total that match and whether it was capped at
        ``COUNT_CAP``. Each filter reads through an index (a folder, a key, a tempo range, an open state)."""
        where, args, indexed = self._filters(query)
        source, rows = f"files f {indexed}", f"SELECT f.id FROM files f {indexed} WHERE {where}"
        if query.state in OPEN:  # the few files with a job in that state, newest first, in the index's order
            source = "jobs j INDEXED BY jobs_open_files JOIN files f ON f.id=j.file_id"
            rows = f"SELECT j.file_id FROM {source} WHERE {where} GROUP BY j.file_id"
        with self._lock:
            ids = [
                r[0]
                for r in self._db.execute(
                    f"{rows} ORDER BY {_order(query)} LIMIT ? OFFSET ?",
                    (*args, query.size, (query.page - 1) * query.size),
                )
            ]
            if not query.filtered:
                counted = self.folder_counts()
                total = counted.get(query.folder, 0) if query.folder else sum(counted.values())
                capped = False
            else:
                total = self._db.execute(f"SELECT COUNT(*) FROM ({rows} LIMIT {COUNT_CAP + 1})", args).fetchone()[0]
                capped = total > COUNT_CAP
                total = min(total, COUNT_CAP)
        return self._listed(ids), int(total), capped

    def _filters(self, query: FileQuery) -> tuple[str, list[Any], str]:
        """The WHERE clause over ``files f``, its arguments, and the index to read when one is best."""
        where: list[str] = ["f.current=1"]
        args: list[Any] = []
        indexed = ""
        if query.folder:
            where.append("f.folder=?")
            args.append(to_db(query.folder))
        if query.key:
            where.append("f.music_key=?")
            args.append(query.key)
            if query.scale:
                where.append("f.music_scale=?")
                args.append(query.scale)
            indexed = "INDEXED BY files_by_key"
        if query.bpm_min is not None or query.bpm_max is not None:
            where.append("f.bpm IS NOT NULL AND f.bpm BETWEEN ? AND ?")
            args += [query.bpm_min if query.bpm_min is not None else -1e9, query.bpm_max or 1e9]
            indexed = indexed or "INDEXED BY files_by_bpm"
        if query.text:
            where.append("instr(lower(f.path), lower(?)) > 0")
            args.append(query.text)
        if query.state in STATES:  # a known word only: it is written into the SQL, so the partial index applies
            if query.state in OPEN:  # read in jobs_open_files, newest first (see list_files); as the index reads
                where.append(f"j.state IN ('pending', 'in_doubt', 'failed') AND j.state='{query.state}'")
            else:
                where.append(f"EXISTS (SELECT 1 FROM jobs j WHERE j.file_id=f.id AND j.state='{query.state}')")
        elif query.state:
            where.append("0")
        return " AND ".join(where), args, indexed

    def listed(self, path: str) -> Listed | None:
        """One current file by its path, with its jobs: one indexed lookup."""
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM files WHERE path=? AND current=1 ORDER BY id DESC LIMIT 1", (to_db(path),)
            ).fetchone()
        found = self._listed([row[0]]) if row else []
        return found[0] if found else None

    def _listed(self, ids: list[int]) -> list[Listed]:
        """The files ``ids`` (in that order) with their jobs and tags."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(
                _JOB_SELECT.replace("f.current", "f.current, f.music_key, f.music_scale, f.bpm")
                + f"WHERE f.id IN ({marks}) ORDER BY j.pipeline",
                ids,
            ).fetchall()
            bare = self._db.execute(
                f"SELECT id AS fid, *, NULL AS pipeline FROM files WHERE id IN ({marks})", ids
            ).fetchall()
        out: dict[int, Listed] = {}
        for r in [*rows, *bare]:
            entry = out.get(r["fid"])
            if entry is None:
                job = self._job(r) if r["pipeline"] is not None else None
                revision = job.file if job is not None else _revision(r)
                entry = out[r["fid"]] = Listed(revision, r["music_key"], r["music_scale"], r["bpm"])
            if r["pipeline"] is not None:
                entry.jobs.append(self._job(r))
        return [out[i] for i in ids if i in out]
