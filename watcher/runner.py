"""The runner: workers that claim due jobs from the store, run their stage, and schedule what comes next.

Failures are classified here, once: RetryLater is retried with backoff (``Retry-After`` when given) until
``max_attempts``; NeedsUser pauses that pipeline and retries after a long pause; BadInput fails the file;
anything unexpected is logged with its traceback and retried like RetryLater. One bad file never stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from watcher.config import RetryConfig
from watcher.errors import BadInput, FileChanged, NeedsUser, RetryLater
from watcher.stages.base import Stage, StageResult
from watcher.store import TERMINAL, Job, Store

log = structlog.get_logger("watcher.runner")
LEASE = 600.0


@dataclass(frozen=True)
class Outcome:
    """What happened to a job in one run, for metrics and webhooks."""

    job: Job
    stage: str
    error: str | None = None
    error_kind: str | None = None


OutcomeHook = Callable[[Outcome], None]


def backoff(attempts: int, cfg: RetryConfig) -> float:
    """Seconds before the next attempt: exponential from ``backoff_initial``, capped, with ±20 % jitter."""
    base = min(cfg.backoff_max, cfg.backoff_initial * (2 ** max(0, attempts - 1)))
    return base * random.uniform(0.8, 1.2)


class Runner:
    """Runs the stages' workers until stopped; ``wake()`` when new work may be due."""

    def __init__(
        self,
        store: Store,
        stages: Mapping[str, Stage],
        *,
        concurrency: Mapping[str, int],
        retry: RetryConfig,
        on_outcome: OutcomeHook = lambda o: None,
        rehint: Callable[[str], None] = lambda path: None,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.stages = dict(stages)
        self.concurrency = dict(concurrency)
        self.retry = retry
        self.on_outcome = on_outcome
        self.rehint = rehint
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}"
        self._wake = {kind: asyncio.Event() for kind in self.stages}
        self._paused_until: dict[str, float] = {}
        self.in_flight: dict[int, asyncio.Task[None]] = {}
        self.busy = 0

    def wake(self, kind: str | None = None) -> None:
        for k, event in self._wake.items():
            if kind is None or k == kind:
                event.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Start every worker and the lease keeper; return when ``stop`` is set and workers have left."""
        async with asyncio.TaskGroup() as tg:
            for kind, stage in self.stages.items():
                for n in range(max(1, self.concurrency.get(kind, 1))):
                    tg.create_task(self._worker(kind, stage, stop), name=f"{kind}-{n}")
            tg.create_task(self._keep_leases(stop), name="leases")
            tg.create_task(self._wake_on(stop), name="stop-waker")

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.wake()

    async def _keep_leases(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LEASE / 4)
            self.store.renew(self.in_flight.keys(), self.owner, lease=LEASE)

    async def _worker(self, kind: str, stage: Stage, stop: asyncio.Event) -> None:
        wake = self._wake[kind]
        while not stop.is_set():
            wake.clear()
            now = time.time()
            paused = self._paused_until.get(kind, 0.0)
            job = None if paused > now else self.store.claim(kind, self.owner, lease=LEASE, now=now)
            if job is None:
                due = self.store.next_due(kind)
                wait = 5.0 if due is None else min(5.0, max(0.05, due - time.time()))
                if paused > now:
                    wait = min(wait, paused - now)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), wait)
                continue
            await self.run_job(stage, job)

    async def run_job(self, stage: Stage, job: Job) -> Outcome:
        """Run one claimed job to its next checkpoint and release it; never raises except on cancellation."""
        path = job.file.path
        self.busy += 1
        task = asyncio.current_task()
        if task is not None:
            self.in_flight[job.id] = task
        try:
            result = await stage.run(job)
        except asyncio.CancelledError:
            # Shutdown: every paid result is already committed; give the job back for the next start.
            self.store.release(job, next_attempt_at=time.time(), error=job.last_error, error_kind=job.error_kind)
            log.info(
                "job.checkpointed",
                path=path,
                kind=job.kind,
                stage=job.stage,
                next="resumes at the next start",
            )
            raise
        except FileChanged as exc:
            log.warning(
                "job.file_changed",
                path=path,
                kind=job.kind,
                error=str(exc),
                next="its new version is picked up once it settles",
            )
            self.rehint(path)
            return self._finish(job, StageResult("superseded", note=f"{exc}"), error_kind=exc.kind)
        except BadInput as exc:
            job.data.setdefault("failed_in", job.stage)
            log.error(
                "job.failed",
                path=path,
                kind=job.kind,
                stage=job.stage,
                error=str(exc),
                next="nothing until the file changes or `watcher retry` is run",
            )
            return self._finish(job, StageResult("failed", note=str(exc)), error_kind=exc.kind)
        except NeedsUser as exc:
            pause = self.retry.needs_user_backoff
            self._paused_until[job.kind] = time.time() + pause
            log.error(
                "job.needs_user",
                path=path,
                kind=job.kind,
                stage=job.stage,
                error=str(exc),
                next=f"{job.kind} paused for {pause:.0f} s; fix the cause, then `watcher retry`",
            )
            self.store.release(job, next_attempt_at=time.time() + pause, error=str(exc), error_kind=exc.kind)
            outcome = Outcome(job, job.stage, str(exc), exc.kind)
            self.on_outcome(outcome)
            return outcome
        except RetryLater as exc:
            return self._retry(job, str(exc), exc.kind, exc.retry_after)
        except OSError as exc:
            return self._retry(job, f"{exc.strerror or exc} ({exc.filename or path})", "retry_later", None)
        except Exception as exc:
            log.exception("job.crashed", path=path, kind=job.kind, stage=job.stage)
            return self._retry(job, f"internal error: {type(exc).__name__}: {exc}", "internal", None)
        finally:
            self.busy -= 1
            self.in_flight.pop(job.id, None)
        return self._finish(job, result)

    def _finish(self, job: Job, result: StageResult, error_kind: str | None = None) -> Outcome:
        if result.stage in TERMINAL:
            self.store.release(job, stage=result.stage, error=result.note, error_kind=error_kind)
            if result.stage in ("done", "skipped", "gone", "superseded"):
                log.info("job." + result.stage, path=job.file.path, kind=job.kind, reason=result.note)
        else:
            # A scheduled next step (e.g. polling a remote job): no attempt is counted.
            self.store.release(job, stage=result.stage, next_attempt_at=result.next_attempt_at)
            self.wake(job.kind)
        outcome = Outcome(job, result.stage, result.note, error_kind)
        self.on_outcome(outcome)
        return outcome

    def _retry(self, job: Job, error: str, kind: str, retry_after: float | None) -> Outcome:
        job.attempts += 1
        if job.attempts >= self.retry.max_attempts:
            job.data.setdefault("failed_in", job.stage)
            log.error(
                "job.failed",
                path=job.file.path,
                kind=job.kind,
                stage=job.stage,
                attempts=job.attempts,
                error=error,
                next="gave up; `watcher retry` tries again",
            )
            self.store.release(job, stage="failed", error=error, error_kind=kind)
            outcome = Outcome(job, "failed", error, kind)
        else:
            delay = retry_after if retry_after is not None else backoff(job.attempts, self.retry)
            log.warning(
                "job.retry_later",
                path=job.file.path,
                kind=job.kind,
                stage=job.stage,
                attempts=job.attempts,
                error=error,
                next=f"retrying in {delay:.0f} s",
            )
            self.store.release(job, next_attempt_at=time.time() + delay, error=error, error_kind=kind)
            outcome = Outcome(job, job.stage, error, kind)
        self.on_outcome(outcome)
        return outcome

    async def drain(self, kinds: list[str] | None = None) -> None:
        """Run due jobs until none is due now (for `watcher scan`); later retries are left scheduled."""
        kinds = kinds or list(self.stages)
        while True:
            ran = False
            for kind in kinds:
                sem = asyncio.Semaphore(max(1, self.concurrency.get(kind, 1)))

                async def one(job: Job, k: str = kind, sem: asyncio.Semaphore = sem) -> None:
                    async with sem:
                        await self.run_job(self.stages[k], job)

                jobs = []
                while (job := self.store.claim(kind, self.owner, lease=LEASE)) is not None:
                    jobs.append(job)
                if jobs:
                    ran = True
                    await asyncio.gather(*(one(j) for j in jobs))
            if not ran:
                return
