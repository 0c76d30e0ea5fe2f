"""What every stage shares: the store interface stages need, and the result a stage returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from watcher.store import Job, StoredResult


@dataclass(frozen=True)
class StageResult:
    """Where a job goes after one run: a terminal stage, or a stage to resume at ``next_attempt_at``.

    ``note`` is a human reason kept as the job's last message (for example why a file was skipped).
    """

    stage: str
    next_attempt_at: float | None = None
    note: str | None = None


class JobStore(Protocol):
    """The part of the store a stage may use (claim and release belong to the runner)."""

    def commit(self, job: Job, *, stage: str | None = None, **data: Any) -> None: ...

    def set_sha256(self, file_id: int, sha256: str) -> None: ...

    def results_for(self, sha256: str, backend: str) -> dict[str, StoredResult]: ...

    def save_result(self, sha256: str, backend: str, result: StoredResult) -> None: ...


class Stage(Protocol):
    """One pipeline (``kind``): called with a claimed job, returns where the job goes next.

    It raises RetryLater, NeedsUser or BadInput (see watcher.errors) when it cannot go on; the runner
    turns those into a schedule and a status line.
    """

    kind: str
    first_stage: str

    async def run(self, job: Job) -> StageResult: ...
