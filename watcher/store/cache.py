"""Content-addressed records: analysis results per model, and IDs returned by paid remote calls."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from watcher.store.models import RemoteObject, StoredResult

if TYPE_CHECKING:
    from watcher.store.core import StoreBase

    _Base = StoreBase
else:
    _Base = object


class CacheMixin(_Base):
    """Results and remote IDs keyed by content hash, so nothing is paid for twice."""

    # -- analysis results (content-addressed) -----------------------------------------------------------

    def results_for(self, sha256: str, backend: str) -> dict[str, StoredResult]:
        """Results already paid for on this content with this backend, keyed by the requested model spec."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM results WHERE sha256=? AND backend=?", (sha256, backend)).fetchall()
        return {
            r["requested"]: StoredResult(
                r["requested"],
                r["model_name"],
                r["model_version"],
                r["correlation_id"],
                json.loads(r["results"]),
            )
            for r in rows
        }

    def save_result(self, sha256: str, backend: str, result: StoredResult) -> None:
        """Persist one model's results the moment they arrive (a lost result would be paid for again)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sha256,
                    backend,
                    result.requested,
                    result.model_name,
                    result.model_version,
                    result.correlation_id,
                    json.dumps(result.results),
                    time.time(),
                ),
            )

    # -- IDs returned by paid calls ----------------------------------------------------------------------

    def remote_get(self, sha256: str, service: str, kind: str, params: str) -> RemoteObject | None:
        """The object already created for this content, kind and parameters, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM remote WHERE sha256=? AND service=? AND kind=? AND params=?",
                (sha256, service, kind, params),
            ).fetchone()
        return (
            None
            if row is None
            else RemoteObject(row["kind"], row["params"], row["remote_id"], row["state"], row["error"])
        )

    def remote_put(
        self, sha256: str, service: str, kind: str, params: str, remote_id: str, state: str = "requested"
    ) -> None:
        """Record an ID the moment a paid call returned it, before anything else happens."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO remote VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                (sha256, service, kind, params, remote_id, state, now, now),
            )

    def remote_set_state(
        self, sha256: str, service: str, kind: str, params: str, state: str, error: str | None = None
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE remote SET state=?, error=?, updated_at=? WHERE sha256=? AND service=? AND kind=? AND params=?",
                (state, error, time.time(), sha256, service, kind, params),
            )

    def remote_forget(self, sha256: str, service: str, kind: str, params: str) -> None:
        """Drop an object the service no longer knows (so it is created again, knowingly)."""
        with self._tx() as db:
            db.execute(
                "DELETE FROM remote WHERE sha256=? AND service=? AND kind=? AND params=?",
                (sha256, service, kind, params),
            )
