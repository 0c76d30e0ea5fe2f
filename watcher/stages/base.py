"""What every pipeline shares: the result of one run, the observer of paid calls, and the pipeline protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from watcher.store import Job


@dataclass(frozen=True)
class StageResult:
    """Where a job goes after one run: a terminal stage, or a stage to resume at ``next_attempt_at``.

    ``note`` is a human reason kept as the job's last message (for example why a file was skipped).
    """

    stage: str
    next_attempt_at: float | None = None
    note: str | None = None


class SpendObserver(Protocol):
    """Told about every paid call as it ends (metrics, webhooks); must never raise."""

    def paid(self, budget: str, operation: str, outcome: str, seconds: float) -> None:
        """One paid request ended: ``outcome`` is answered, not_sent, in_doubt or partial (some models missing)."""
        ...

    def capped(self, budget: str, spent_seconds: float, cap_seconds: float, until: float) -> None:
        """A paid call was not sent because ``budget``'s daily cap would be passed (first time today)."""
        ...


class NullSpend:
    """Nobody listens."""

    def paid(self, budget: str, operation: str, outcome: str, seconds: float) -> None:
        return

    def capped(self, budget: str, spent_seconds: float, cap_seconds: float, until: float) -> None:
        return


class Stage(Protocol):
    """One pipeline (``kind``: analyze, archive): called with a claimed job, returns where the job goes next.

    It raises the errors of watcher.errors when it cannot go on; the runner turns them into a schedule and a
    status line, and counts attempts (nowhere else does). ``service`` names the remote service the pipeline
    depends on (None when it runs locally): an account problem there pauses the pipeline. ``give_up`` is
    called once when the runner fails a job for good, to leave a record of what is known (a partial sidecar).
    """

    kind: str
    first_stage: str
    service: str | None

    async def run(self, job: Job) -> StageResult: ...

    async def give_up(self, job: Job, error: str) -> None: ...
