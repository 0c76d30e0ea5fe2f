"""Analysis results per content, backend (where the work was done) and model: paid for once, kept for good; and
the IDs of paid work a new store takes back from a verified record on disk (the gate's adoption)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from watcher.store.models import Fence, Operation, StoredResult
from watcher.store.sqlite.gate import answered

if TYPE_CHECKING:
    from watcher.store.sqlite.core import StoreBase

    _Base = StoreBase
else:
    _Base = object

_CHUNK = 500  # contents per statement (SQLite limits the parameters of one)


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

    def stored_models(self, sha256s: Sequence[str], backend: str) -> dict[str, set[str]]:
        """The model specs stored for each of these contents with this backend (a content with none is left out):
        :meth:`results_for` for many at once, without the results themselves."""
        found: dict[str, set[str]] = {}
        unique = list(dict.fromkeys(sha256s))
        with self._lock:
            for i in range(0, len(unique), _CHUNK):
                chunk = unique[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT sha256, requested FROM results WHERE backend=? AND sha256 IN ({marks})", (backend, *chunk)
                ).fetchall()
                for sha256, requested in rows:
                    found.setdefault(sha256, set()).add(requested)
        return found

    def save_result(
        self, sha256: str, backend: str, result: StoredResult, op: Operation | None = None, fence: Fence | None = None
    ) -> bool:
        """Persist one model's results the moment they arrive (a lost result would be paid for again).

        With ``op`` (and the ``fence`` of the take that sent it), the model's paid operation is marked answered in
        the same transaction. False when that take lost the operation (late): the results are kept all the same,
        beside (never over) what a newer holder stored, and the operation changes only if nobody holds it.
        """
        now = time.time()
        with self._tx() as db:
            fenced = True
            if op is not None:
                assert fence is not None, "a paid result names the take that sent it"
                fenced = answered(db, op, None, fence, now, remote=False)
            db.execute(
                f"INSERT OR {'REPLACE' if fenced else 'IGNORE'} INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sha256,
                    backend,
                    result.requested,
                    result.model_name,
                    result.model_version,
                    result.correlation_id,
                    json.dumps(result.results),
                    now,
                ),
            )
            return fenced

    def gate_adopt(self, op: Operation, result: str) -> bool:
        """An ID paid for in another store's life, read from a verified record on disk: the operation is answered
        with it (no ledger line: it was charged in that life's ledger). False when this gate knows the operation
        already (its own record wins)."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO operations (sha256, service, operation, params, on_doubt, state, result, remote_state, "
                "sends, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'answered', ?, 'requested', 0, ?, ?) "
                "ON CONFLICT (sha256, service, operation, params) DO NOTHING",
                (op.sha256, op.service, op.name, op.params, op.on_doubt, result, now, now),
            )
            return bool(cur.rowcount)
