"""Folder state (pause, health) and the views behind `watcher status` and `watcher retry`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from watcher.names import from_db, is_text, text, to_db
from watcher.store.models import _JOB_SELECT, Job, Problem, RetryAsk, State, Step
from watcher.store.rules import below, path_order, utc_day

if TYPE_CHECKING:
    from watcher.store.sqlite.core import StoreBase

    _Base = StoreBase
else:
    _Base = object

_CHUNK = 500  # job IDs per statement (SQLite limits the parameters of one)


class ControlMixin(_Base):
    """Folders, reports and retries."""

    # -- folders ---------------------------------------------------------------------------------------

    def set_paused(self, folder: str, *, paused: bool) -> None:
        """Pause or resume work on a folder's files (detection still records them, so nothing is lost)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO folder_state (path, paused, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (path) DO UPDATE SET paused=excluded.paused, updated_at=excluded.updated_at",
                (to_db(folder), int(paused), time.time()),
            )

    def paused_folders(self) -> set[str]:
        with self._lock:
            return {from_db(r[0]) for r in self._db.execute("SELECT path FROM folder_state WHERE paused=1")}

    def set_folder_health(self, folder: str, *, mode: str | None, reason: str | None, available: bool) -> None:
        """What the running daemon sees of a folder (watch mode, why, reachable), for `watcher status`."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO folder_state (path, mode, reason, available, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (path) DO UPDATE SET mode=excluded.mode, reason=excluded.reason, "
                "available=excluded.available, updated_at=excluded.updated_at",
                (to_db(folder), mode, text(reason), int(available), time.time()),
            )

    def folder_states(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM folder_state ORDER BY path").fetchall()
        return [
            {
                "folder": from_db(r["path"]),
                "paused": bool(r["paused"]),
                "mode": r["mode"],
                "reason": r["reason"],
                "available": None if r["available"] is None else bool(r["available"]),
                "updated_at": r["updated_at"],
            }
            for r in rows
        ]

    # -- reporting and control -------------------------------------------------------------------------

    def problems(self, limit: int | None = None) -> list[Problem]:
        """Current revisions whose jobs failed, are held in doubt, or wait to retry after an error (the first
        ``limit`` in path order, when given)."""
        with self._lock:
            rows = self._db.execute(
                _JOB_SELECT + "WHERE f.current=1 AND (j.state IN ('failed', 'in_doubt') OR (j.last_error IS NOT NULL "
                "AND j.state='pending')) ORDER BY f.path, j.pipeline LIMIT ?",
                (-1 if limit is None else limit,),
            ).fetchall()
        return [
            Problem(
                path=from_db(r["path"]),
                pipeline=r["pipeline"],
                step=Step(r["step"]),
                state=State(r["state"]),
                error_code=r["error_code"],
                error=r["last_error"],
                attempts=r["attempts"],
                next_attempt_at=r["next_attempt_at"] if r["state"] == State.PENDING else None,
                data=json.loads(r["data"]),
            )
            for r in rows
        ]

    def jobs_of_file(self, file_id: int) -> list[Job]:
        """Every job of one revision."""
        with self._lock:
            rows = self._db.execute(_JOB_SELECT + "WHERE f.id=? ORDER BY j.pipeline", (file_id,)).fetchall()
        return [self._job(r) for r in rows]

    def jobs_of_current(self) -> list[Job]:
        """Every job of every current revision (for the per-file view of `watcher status`)."""
        with self._lock:
            rows = self._db.execute(_JOB_SELECT + "WHERE f.current=1 ORDER BY f.path, j.pipeline").fetchall()
        return [self._job(r) for r in rows]

    def jobs_under(self, paths: Sequence[str]) -> list[Job]:
        """The jobs of the current revisions at or under ``paths`` (a file, or a folder and all below it), in path
        order. Ranges of the ``files_by_path`` index, so the cost follows the files found, not the store's size: a
        name stored as text and one stored as bytes (not UTF-8, see ``to_db``) each have their range."""
        where: list[tuple[str, tuple[Any, ...]]] = []
        for path in paths:
            low, high = below(path)
            where.append(("f.path=?", (to_db(path),)))
            where.append(("f.path>=? AND f.path<?", (low, high)))
            if is_text(path):  # else every name below it is stored as bytes too
                where.append(("f.path>=? AND f.path<?", (low.decode(), high.decode())))
        with self._lock:
            rows = [r for sql, a in where for r in self._db.execute(f"{_JOB_SELECT}WHERE {sql} AND f.current=1", a)]
        return path_order(self._job(r) for r in rows)

    def current_jobs_after(self, file_id: int, files: int) -> list[Job]:
        """The jobs of the first ``files`` current revisions with jobs whose ID is above ``file_id``, in ID order (a
        page: a revision's jobs are never split, and the next page starts after the last one's ID)."""
        with self._lock:
            rows = self._db.execute(
                _JOB_SELECT + "WHERE f.id IN (SELECT id FROM files WHERE current=1 AND id>? AND EXISTS "
                "(SELECT 1 FROM jobs WHERE file_id=files.id) ORDER BY id LIMIT ?) ORDER BY f.id, j.pipeline",
                (file_id, files),
            ).fetchall()
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
        """Make jobs of current revisions due now, at the step they stopped at: those under ``paths`` that failed,
        wait or are held, every failed one (``failed``), every one held in doubt (``in_doubt``). A held job's
        operations may be sent again (each re-send is counted by the gate). Returns how many jobs were reset."""
        ask = RetryAsk(
            by_path=paths is not None,
            failed=failed,
            in_doubt=in_doubt,
            waiting_on_service=waiting_on_service,
            pipelines=pipelines,
        )
        now = time.time()
        changed = 0
        with self._tx() as db:
            sql = _JOB_SELECT + "WHERE f.current=1 AND j.state IN ('pending', 'failed', 'in_doubt')"
            narrow, narrow_args = ask.narrowing("?")  # by path: no narrowing but the pipelines'
            if paths is None:
                rows = db.execute(sql + narrow, narrow_args).fetchall()
            else:  # in chunks: a folder's files may pass the parameters one statement takes (32,766 by default)
                plist = [to_db(p) for p in paths]
                rows = [
                    row
                    for start in range(0, len(plist), _CHUNK)
                    for row in db.execute(
                        f"{sql} AND f.path IN ({','.join('?' * len(plist[start : start + _CHUNK]))}){narrow}",
                        [*plist[start : start + _CHUNK], *narrow_args],
                    )
                ]
            for row in rows:
                if not ask.takes(row["state"], row["error_code"], row["pipeline"]):
                    continue
                data, held = RetryAsk.release(row["state"], row["data"])
                for key in held:
                    db.execute(
                        "UPDATE operations SET state='reask', updated_at=? WHERE state='in_doubt' AND sha256=? "
                        "AND service=? AND operation=? AND params=?",
                        (now, *key),
                    )
                db.execute(
                    "UPDATE jobs SET state='pending', attempts=0, next_attempt_at=?, last_error=NULL, error_code=NULL, "
                    "data=?, updated_at=? WHERE id=?",
                    (now, data, now, row["id"]),
                )
                changed += 1
        return changed

    def wake_capped(self) -> int:
        """Make every pending job a daily cap deferred due now, and clear today's cap marks (``capped_at``): the
        settings now in force decide again, since the gate checks the cap before any paid call and marks the day
        anew if it is still reached. Attempts are kept (a cap is no failure). Returns how many jobs were woken."""
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE spend SET capped_at=NULL WHERE day=? AND capped_at IS NOT NULL", (utc_day(now),))
            cur = db.execute(
                "UPDATE jobs SET next_attempt_at=?, last_error=NULL, error_code=NULL, updated_at=? "
                "WHERE state='pending' AND error_code='capped' AND lease_owner IS NULL",
                (now, now),
            )
            return int(cur.rowcount)

    def add_jobs(self, file_ids: Sequence[int], pipeline: str, step: Step) -> int:
        """Queue ``pipeline`` at ``step`` for revisions that have no job of it yet (a back-fill); how many."""
        now = time.time()
        added = 0
        with self._tx() as db:
            for file_id in file_ids:
                cur = db.execute(
                    "INSERT INTO jobs (file_id, pipeline, step, state, next_attempt_at, updated_at) "
                    "SELECT ?, ?, ?, 'pending', ?, ? WHERE NOT EXISTS "
                    "(SELECT 1 FROM jobs WHERE file_id=? AND pipeline=?)",
                    (file_id, pipeline, step, now, now, file_id, pipeline),
                )
                added += cur.rowcount
        return added

    def reopen(self, job_ids: Sequence[int], step: Step) -> int:
        """Make finished (``done``) jobs pending again at ``step``: the config asks for more than they did (a
        model, a version); what was paid for is kept, so only the new work is asked. How many."""
        now = time.time()
        changed = 0
        with self._tx() as db:
            for job_id in job_ids:
                cur = db.execute(
                    "UPDATE jobs SET state='pending', step=?, attempts=0, next_attempt_at=?, last_error=NULL, "
                    "error_code=NULL, updated_at=? WHERE id=? AND state='done'",
                    (step, now, now, job_id),
                )
                changed += cur.rowcount
        return changed

    def promote(self, job_ids: Sequence[int]) -> int:
        """Rank the pending jobs among ``job_ids`` as live (see store.lanes), as a live registration does: files
        `watcher scan PATH` names that already wait go before the backlog. How many files had a job moved (jobs
        live already, or no longer pending, are left as they are)."""
        ids = list(job_ids)
        moved: set[int] = set()
        with self._tx() as db:
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                rows = db.execute(
                    f"UPDATE jobs SET live=1 WHERE id IN ({','.join('?' * len(chunk))}) AND state='pending' "
                    "AND live=0 RETURNING file_id",
                    chunk,
                ).fetchall()
                moved.update(int(r[0]) for r in rows)
        return len(moved)
