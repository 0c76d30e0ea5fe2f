"""Folder state (pause, health) and the views behind `watcher status` and `watcher retry`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from watcher.names import from_db, to_db
from watcher.store.models import _JOB_SELECT, Job, Problem
from watcher.store.schema import TERMINAL

if TYPE_CHECKING:
    from watcher.store.core import StoreBase

    _Base = StoreBase
else:
    _Base = object


class ControlMixin(_Base):
    """Folders, reports and retries."""

    # -- folders ---------------------------------------------------------------------------------------

    def set_paused(self, folder: str, paused: bool) -> None:
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
                (to_db(folder), mode, reason, int(available), time.time()),
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

    def counts(self) -> dict[str, dict[str, int]]:
        """Jobs per kind and stage, for the current versions of files."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for row in self._db.execute(
                "SELECT j.kind, j.stage, COUNT(*) AS n FROM jobs j JOIN files f ON f.id=j.file_id "
                "WHERE f.current=1 GROUP BY j.kind, j.stage ORDER BY j.kind, j.stage"
            ):
                out.setdefault(row["kind"], {})[row["stage"]] = row["n"]
        return out

    def problems(self) -> list[Problem]:
        """Current versions whose jobs failed, or are waiting to retry after an error."""
        with self._lock:
            rows = self._db.execute(
                _JOB_SELECT + "WHERE f.current=1 AND (j.stage='failed' OR (j.last_error IS NOT NULL "
                f"AND j.stage NOT IN ({','.join('?' * len(TERMINAL))}))) ORDER BY f.path, j.kind",
                tuple(TERMINAL),
            ).fetchall()
        held = ("in_doubt",)
        return [
            Problem(
                path=from_db(r["path"]),
                kind=r["kind"],
                stage=r["stage"],
                error_kind=r["error_kind"],
                error=r["last_error"],
                attempts=r["attempts"],
                next_attempt_at=None if r["stage"] in TERMINAL or r["error_kind"] in held else r["next_attempt_at"],
                data=json.loads(r["data"]),
            )
            for r in rows
        ]

    def jobs_of_file(self, file_id: int) -> list[Job]:
        """Every job of one file version."""
        with self._lock:
            rows = self._db.execute(_JOB_SELECT + "WHERE f.id=? ORDER BY j.kind", (file_id,)).fetchall()
        return [self._job(r) for r in rows]

    def jobs_of_current(self) -> list[Job]:
        """Every job of every current file version (for the per-file view of `watcher status`)."""
        with self._lock:
            rows = self._db.execute(_JOB_SELECT + "WHERE f.current=1 ORDER BY f.path, j.kind").fetchall()
        return [self._job(r) for r in rows]

    def retry(
        self,
        *,
        paths: Iterable[str] | None = None,
        failed: bool = False,
        in_doubt: bool = False,
        restart_stage: dict[str, str],
    ) -> int:
        """Make jobs of current versions due now: those under ``paths`` that failed, wait or are held, every failed
        one (``failed``), every one held in doubt (``in_doubt``). A held job's in-doubt operations may be sent again
        (each re-send is counted by the gate). ``restart_stage`` maps a pipeline to the stage a failed job restarts
        from when it did not record one. Returns how many jobs were reset."""
        now = time.time()
        changed = 0
        with self._tx() as db:
            sql = _JOB_SELECT + "WHERE f.current=1"
            args: list[Any] = []
            if paths is not None:
                plist = list(paths)
                sql += f" AND f.path IN ({','.join('?' * len(plist))})"
                args.extend(to_db(p) for p in plist)
            for row in db.execute(sql, args).fetchall():
                is_failed = row["stage"] == "failed"
                held = row["error_kind"] == "in_doubt"
                waiting = row["stage"] not in TERMINAL
                by_path = paths is not None and (is_failed or waiting)
                if not (by_path or (failed and is_failed) or (in_doubt and held)):
                    continue
                data = json.loads(row["data"])
                stage = row["stage"]
                if is_failed:
                    stage = data.get("failed_in") or restart_stage.get(row["kind"], "pending")
                for key in (data.pop("in_doubt", None) or {}).get("keys", []) if held else []:
                    db.execute(
                        "UPDATE operations SET state='reask', updated_at=? WHERE state='in_doubt' AND sha256=? "
                        "AND service=? AND operation=? AND params=?",
                        (now, *key),
                    )
                db.execute(
                    "UPDATE jobs SET stage=?, attempts=0, next_attempt_at=?, last_error=NULL, error_kind=NULL, "
                    "data=?, updated_at=? WHERE id=?",
                    (stage, now, json.dumps(data), now, row["id"]),
                )
                changed += 1
        return changed
