"""Analysis results per content, backend (where the work was done) and model: paid for once, kept for good."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from watcher.store.models import Operation, StoredResult

if TYPE_CHECKING:
    from watcher.store.core import StoreBase

    _Base = StoreBase
else:
    _Base = object


class CacheMixin(_Base):
    """Analysis results keyed by content hash and backend, so nothing is paid for twice."""

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

    def save_result(self, sha256: str, backend: str, result: StoredResult, op: Operation | None = None) -> None:
        """Persist one model's results the moment they arrive (a lost result would be paid for again).

        With ``op``, the model's paid operation is marked answered in the same transaction.
        """
        with self._tx() as db:
            if op is not None:
                db.execute(
                    "UPDATE operations SET state='answered', holder=NULL, lease_until=NULL, error=NULL, updated_at=? "
                    "WHERE sha256=? AND service=? AND operation=? AND params=?",
                    (time.time(), op.sha256, op.service, op.name, op.params),
                )
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
