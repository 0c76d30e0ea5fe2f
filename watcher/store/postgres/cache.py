"""The PostgreSQL store's results cache: one model's results kept by content the moment they arrive, by any node."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from watcher.store.models import Fence, Operation, StoredResult
from watcher.store.postgres.base import op_answered
from watcher.store.postgres.schema import NOW

if TYPE_CHECKING:
    from watcher.store.postgres.base import PgBase as _Base
else:
    _Base = object


class PgCacheMixin(_Base):
    """Results paid for, by content and backend (the same contract as the SQLite cache's)."""

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

    def stored_models(self, sha256s: Sequence[str], backend: str) -> dict[str, set[str]]:
        """The model specs stored for each of these contents with this backend (see the SQLite adapter)."""
        rows = self._all(
            "SELECT sha256, requested FROM results WHERE backend=%s AND sha256 = ANY(%s)", (backend, list(sha256s))
        )
        found: dict[str, set[str]] = {}
        for r in rows:
            found.setdefault(r["sha256"], set()).add(r["requested"])
        return found

    def save_result(
        self, sha256: str, backend: str, result: StoredResult, op: Operation | None = None, fence: Fence | None = None
    ) -> bool:
        """Persist one model's results the moment they arrive; with ``op`` (and its take's ``fence``), mark it
        answered in the same transaction. False when that take lost the operation (late): the results are kept
        beside (never over) a newer holder's, and the operation changes only when nobody holds it."""

        def go(db: psycopg.Connection[Any]) -> bool:
            fenced = True
            if op is not None:
                assert fence is not None, "a paid result names the take that sent it"
                fenced = op_answered(db, op, None, fence, remote=False)
            db.execute(
                f"INSERT INTO results VALUES (%s, %s, %s, %s, %s, %s, %s, {NOW}) "
                "ON CONFLICT (sha256, backend, requested) "
                + (
                    "DO UPDATE SET model_name=excluded.model_name, model_version=excluded.model_version, "
                    "correlation_id=excluded.correlation_id, results=excluded.results, created_at=excluded.created_at"
                    if fenced
                    else "DO NOTHING"
                ),
                (
                    sha256,
                    backend,
                    result.requested,
                    result.model_name,
                    result.model_version,
                    result.correlation_id,
                    json.dumps(result.results),
                ),
            )
            return fenced

        return bool(self._run(go))
