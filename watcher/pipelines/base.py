"""What every pipeline shares: the result of one step, the observer of paid calls, and the pipeline protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from watcher.store import Job, State, Step


@dataclass(frozen=True)
class StepResult:
    """Where a job goes after one run: a final ``state`` (done, skipped, gone, superseded), or ``pending`` at
    ``step`` from ``at`` (a Unix time; e.g. the next status poll).

    ``note`` is a human reason kept as the job's last message (for example why a file was skipped).
    """

    state: State
    step: Step | None = None
    at: float | None = None
    note: str | None = None

    @classmethod
    def later(cls, step: Step, at: float) -> StepResult:
        """Come back to ``step`` at ``at`` (no attempt is counted: this is progress, not a failure)."""
        return cls(State.PENDING, step, at)


class SpendObserver(Protocol):
    """Told about every paid call as it ends (metrics, webhooks); must never raise."""

    def paid(self, budget: str, operation: str, ending: str, seconds: float) -> None:
        """One paid request ended: ``ending`` is answered, not_sent, in_doubt or partial (some models missing)."""
        ...

    def capped(self, budget: str, spent_seconds: float, cap_seconds: float, until: float) -> None:
        """A paid call was not sent because ``budget``'s daily cap would be passed (first time today)."""
        ...


class NullSpend:
    """Nobody listens."""

    def paid(self, budget: str, operation: str, ending: str, seconds: float) -> None:
        return

    def capped(self, budget: str, spent_seconds: float, cap_seconds: float, until: float) -> None:
        return


class Pipeline(Protocol):
    """What is done to every revision (``name``: analyze, archive), in steps; ``run`` takes a claimed job
    from its step as far as it can go now and says where the job goes next.

    It raises the errors of watcher.errors when it cannot go on; the runner turns them into a schedule and a
    status line, and counts attempts (nowhere else does). ``service`` names the remote service the pipeline
    depends on (None when it runs locally): an account problem there pauses the pipeline. ``give_up`` is
    called once when the runner fails a job for good, to leave a record of what is known (a partial sidecar).
    """

    @property
    def name(self) -> str: ...

    @property
    def first_step(self) -> Step: ...

    @property
    def service(self) -> str | None: ...

    async def run(self, job: Job) -> StepResult: ...

    async def give_up(self, job: Job, error: str) -> None: ...
