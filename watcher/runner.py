"""The runner: the one scheduler. Workers claim due jobs from the store, run their pipeline, schedule what is next.

Failures are classified here, once, by their scope (see watcher.errors), and attempts are counted here only:

- transient (RetryLater): backed off (``Retry-After`` when given) until ``max_attempts``, then failed;
- deferred (waiting for another copy's answer, a daily cap): scheduled for later, no attempt counted;
- service (NeedsUser): that service's pipelines pause for ``needs_user_backoff``; other work goes on;
- this file (BadInput): failed at once when final, else (the service refused it) a few attempts, then failed;
- in doubt (InDoubt): held for the user, shown in `watcher status`, until `watcher retry`;
- a job superseded meanwhile (LeaseLost): its late result is dropped; a newer revision has its own job.

One bad file never stops the runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from watcher.config import RetryConfig
from watcher.errors import BadInput, Deferred, FileChanged, InDoubt, NeedsUser, RetryLater
from watcher.names import display
from watcher.pipelines.base import Pipeline, StepResult
from watcher.store import TERMINAL, Job, LeaseLost, State
from watcher.store.aio import AsyncJobs as JobQueue

log = structlog.get_logger("watcher.runner")
LEASE = 600.0
LOOK_EVERY = (2.5, 5.0)  # seconds between two looks at the store by an idle lookout (jittered)
PEER_WAIT = 60.0  # how long an idle worker other than the lookout sleeps when it knows of no work due
FILE_ATTEMPTS = 3  # attempts for a file the service refused (4xx, malformed answers) before it fails
FINAL_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.ELOOP})


@dataclass(frozen=True)
class Outcome:
    """What happened to a job in one run, for metrics, webhooks and the mover."""

    job: Job
    state: State  # the job's state after the run: pending, in_doubt, or a final one
    error: str | None = None
    error_code: str | None = None


OutcomeHook = Callable[[Outcome], None]


def backoff(attempts: int, cfg: RetryConfig) -> float:
    """Seconds before the next attempt: exponential from ``backoff_initial``, capped, with ±20 % jitter."""
    base = min(cfg.backoff_max, cfg.backoff_initial * (2 ** max(0, attempts - 1)))
    return float(base * random.uniform(0.8, 1.2))


class Runner:
    """Runs the pipelines' workers until stopped; ``wake()`` when new work may be due."""

    def __init__(
        self,
        store: JobQueue,
        pipelines: Mapping[str, Pipeline],
        *,
        concurrency: Mapping[str, int],
        retry: RetryConfig,
        on_outcome: OutcomeHook = lambda o: None,
        rehint: Callable[[str], None] = lambda path: None,
        holder: str | None = None,
        lease: float = LEASE,
        look_every: tuple[float, float] = LOOK_EVERY,
    ) -> None:
        self.store = store
        self.lease = lease  # seconds a claim holds without renewal: how soon another node takes over a dead one
        self.pipelines = dict(pipelines)
        self.concurrency = dict(concurrency)
        self.retry = retry
        self.on_outcome = on_outcome
        self.rehint = rehint
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}"
        self._wake = {name: asyncio.Event() for name in self.pipelines}
        self._paused_until: dict[str, float] = {}  # service -> until when its pipelines pause
        self.look_every = look_every  # seconds (a random pick between the two) an idle lookout waits between looks
        self._lookout: dict[str, object] = {}  # pipeline -> the idle worker that looks at the store on a timer
        self.running: dict[int, asyncio.Task[Any]] = {}
        self.busy = 0

    def wake(self, pipeline: str | None = None) -> None:
        for name, event in self._wake.items():
            if pipeline is None or name == pipeline:
                event.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Start every worker and the lease keeper; return when ``stop`` is set and workers have left."""
        async with asyncio.TaskGroup() as tg:
            for name, pipeline in self.pipelines.items():
                for n in range(max(1, self.concurrency.get(name, 1))):
                    tg.create_task(self._worker(pipeline, stop), name=f"{name}-{n}")
            tg.create_task(self._keep_leases(stop), name="leases")
            tg.create_task(self._wake_on(stop), name="stop-waker")

    async def drain(self, *, horizon: float = 10.0, interrupt: asyncio.Event | None = None) -> None:
        """Run the same workers until no job is running and none is due within ``horizon`` seconds (`scan`), or
        ``interrupt`` is set (then running jobs end and nothing new is claimed).

        Work scheduled further out (a long backoff, a cap, a job held in doubt) is left in the store.
        """
        stop = asyncio.Event()

        async def watch() -> None:
            while True:
                await asyncio.sleep(0.05)
                if interrupt is not None and interrupt.is_set():
                    stop.set()
                    return
                if self.busy:
                    continue
                now = time.time()
                dues = [
                    await self.store.next_due(name)
                    for name, pipeline in self.pipelines.items()
                    if self._paused(pipeline) <= now + horizon  # a paused service's work stays for later
                ]
                if all(d is None or d > now + horizon for d in dues):
                    stop.set()
                    return

        watcher = asyncio.create_task(watch())
        try:
            await self.run(stop)
        finally:
            watcher.cancel()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.wake()

    async def _keep_leases(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.lease / 4)
            await self.store.renew(list(self.running), self.holder, lease=self.lease)

    def pause_service(self, service: str, until: float = math.inf) -> None:
        """Claim no job of ``service``'s pipelines until ``until`` (a Unix time; by default until resumed)."""
        self._paused_until[service] = until

    def resume_service(self, service: str | None = None) -> None:
        """Lift the pause of ``service`` (every service when None) and wake its workers."""
        for name in [service] if service is not None else list(self._paused_until):
            self._paused_until.pop(name, None)
        for pipeline in self.pipelines.values():
            if service is None or pipeline.service == service:
                self.wake(pipeline.name)

    def paused_services(self) -> dict[str, float]:
        """Each paused service and until when (``inf``: until resumed)."""
        now = time.time()
        return {s: until for s, until in self._paused_until.items() if until > now}

    def pipelines_of(self, service: str) -> list[str]:
        """The pipelines that pay ``service``."""
        return [name for name, p in self.pipelines.items() if p.service == service]

    def _paused(self, pipeline: Pipeline) -> float:
        return self._paused_until.get(pipeline.service, 0.0) if pipeline.service else 0.0

    async def _worker(self, pipeline: Pipeline, stop: asyncio.Event) -> None:
        """Claim and run jobs until ``stop``. When nothing is due, one idle worker of the pipeline (the lookout)
        looks at the store on a timer, for work other nodes or commands add; the other idle ones sleep until
        woken or until work they know of falls due, so 40 idle workers query the store as often as one."""
        wake = self._wake[pipeline.name]
        me = object()
        while not stop.is_set():
            wake.clear()
            now = time.time()
            paused = self._paused(pipeline)
            job = None if paused > now else await self.store.claim(pipeline.name, self.holder, lease=self.lease)
            if job is None:
                due = await self.store.next_due(pipeline.name)
                lookout = self._lookout.setdefault(pipeline.name, me) is me
                if lookout:  # nothing due: look again, with jitter so nodes sharing a store do not look in step
                    wait = (
                        random.uniform(*self.look_every)
                        if due is None
                        else min(self.look_every[1], max(0.05, due - time.time()))
                    )
                else:
                    wait = PEER_WAIT if due is None else min(PEER_WAIT, max(0.05, due - time.time()))
                if paused > now:
                    wait = min(wait, paused - now)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):  # woken at once by wake(): no task is made per wait
                        await wake.wait()
                continue
            if self._lookout.get(pipeline.name) is me:
                del self._lookout[pipeline.name]  # busy now: the next worker to go idle keeps the lookout
                wake.set()  # and the idle ones look too: more than one job may have fallen due
            await self.run_job(pipeline, job)

    async def run_job(self, pipeline: Pipeline, job: Job) -> Outcome:
        """Run one claimed job to its next checkpoint and release it; never raises except on cancellation."""
        self.busy += 1
        task = asyncio.current_task()
        if task is not None:
            self.running[job.id] = task
        try:
            try:
                result = await pipeline.run(job)
            except asyncio.CancelledError:
                # Shutdown: every paid result is already committed; give the job back for the next start.
                with contextlib.suppress(LeaseLost):
                    await self.store.release(
                        job, next_attempt_at=time.time(), error=job.last_error, error_code=job.error_code
                    )
                log.info("job.checkpointed", path=display(job.file.path), pipeline=job.pipeline, step=job.step)
                raise
            except Exception as exc:
                return await self._failed(pipeline, job, exc)
            return await self._finish(job, result)
        except LeaseLost as exc:
            log.info(
                "job.superseded_late",
                path=display(job.file.path),
                pipeline=job.pipeline,
                reason=str(exc),
                next="its paid results are kept; the newer revision is handled by its own job",
            )
            return Outcome(job, State.SUPERSEDED, str(exc), "superseded")
        finally:
            self.busy -= 1
            self.running.pop(job.id, None)

    async def _failed(self, pipeline: Pipeline, job: Job, exc: Exception) -> Outcome:
        """Classify one failure by its scope and schedule the job accordingly (see the module docstring)."""
        path = display(job.file.path)
        if isinstance(exc, FileChanged):
            log.warning(
                "job.file_changed", path=path, pipeline=job.pipeline, error=str(exc), next="its new revision is handled"
            )
            self.rehint(job.file.path)
            return await self._finish(job, StepResult(State.SUPERSEDED, note=str(exc)), error_code=exc.code)
        if isinstance(exc, Deferred):
            if exc.routine:  # pacing, not a problem: nothing for `watcher status` to show
                log.debug("job.deferred", path=path, pipeline=job.pipeline, reason=str(exc), until=round(exc.until, 1))
                await self.store.release(job, next_attempt_at=exc.until)
                return self._tell(Outcome(job, State.PENDING))
            log.info("job.deferred", path=path, pipeline=job.pipeline, reason=str(exc), until=round(exc.until, 1))
            await self.store.release(job, next_attempt_at=exc.until, error=str(exc), error_code=exc.code)
            return self._tell(Outcome(job, State.PENDING, str(exc), exc.code))
        if isinstance(exc, InDoubt):
            job.data["in_doubt"] = {"operation": exc.operation, "since": exc.since, "keys": exc.keys}
            log.warning(
                "job.in_doubt",
                path=path,
                pipeline=job.pipeline,
                operation=exc.operation,
                error=str(exc),
                next="held until `watcher retry --in-doubt` or `watcher retry PATH`",
            )
            await self.store.release(job, state=State.IN_DOUBT, error=str(exc), error_code=exc.code)
            return self._tell(Outcome(job, State.IN_DOUBT, str(exc), exc.code))
        if isinstance(exc, BadInput) and (exc.final or job.attempts + 1 >= FILE_ATTEMPTS):
            return await self._give_up(pipeline, job, str(exc), exc.code, count=not exc.final)
        if isinstance(exc, BadInput):
            return await self._retry(job, str(exc), exc.code, None)
        if isinstance(exc, NeedsUser):
            return await self._pause_service(pipeline, job, exc)
        if isinstance(exc, RetryLater):
            return await self._retry_or_fail(pipeline, job, str(exc), exc.code, exc.retry_after)
        if isinstance(exc, OSError):
            named = exc.filename2 if isinstance(exc.filename2, str) else exc.filename
            where = display(named) if isinstance(named, str) else path
            error = f"{exc.strerror or exc} ({where})"
            if exc.errno in FINAL_ERRNOS:  # a name too long, a file that is a folder: retrying cannot help
                return await self._give_up(pipeline, job, error, "bad_input", count=False)
            return await self._retry_or_fail(pipeline, job, error, "retry_later", None)
        log.exception("job.crashed", path=path, pipeline=job.pipeline, step=job.step)
        error = f"internal error: {type(exc).__name__}: {exc}"
        return await self._retry_or_fail(pipeline, job, error, "internal", None)

    async def _pause_service(self, pipeline: Pipeline, job: Job, exc: NeedsUser) -> Outcome:
        pause = self.retry.needs_user_backoff
        service = pipeline.service or pipeline.name
        self._paused_until[service] = time.time() + pause
        log.error(
            "service.paused",
            path=display(job.file.path),
            pipeline=job.pipeline,
            service=service,
            error=str(exc),
            next=f"the {service} service is paused for {pause:.0f} s (other work goes on); fix the account, "
            "then reload (the key is checked again) or `watcher retry --failed`",
        )
        await self.store.release(job, next_attempt_at=time.time() + pause, error=str(exc), error_code=exc.code)
        return self._tell(Outcome(job, State.PENDING, str(exc), exc.code))

    async def _finish(self, job: Job, result: StepResult, error_code: str | None = None) -> Outcome:
        if result.state in TERMINAL:
            await self.store.release(job, state=result.state, error=result.note, error_code=error_code)
            why = {} if result.note is None else {"reason": result.note}
            log.info("job." + result.state, path=display(job.file.path), pipeline=job.pipeline, **why)
        else:
            # The next step is scheduled (e.g. polling a remote job): progress, so no attempt is counted.
            await self.store.release(job, step=result.step, next_attempt_at=result.at)
            self.wake(job.pipeline)
        return self._tell(Outcome(job, result.state, result.note, error_code))

    async def _retry_or_fail(
        self, pipeline: Pipeline, job: Job, error: str, code: str, retry_after: float | None
    ) -> Outcome:
        if job.attempts + 1 >= self.retry.max_attempts:
            return await self._give_up(pipeline, job, error, code, count=True)
        return await self._retry(job, error, code, retry_after)

    async def _retry(self, job: Job, error: str, code: str, retry_after: float | None) -> Outcome:
        job.attempts += 1
        delay = retry_after if retry_after is not None else backoff(job.attempts, self.retry)
        log.warning(
            "job.retry_later",
            path=display(job.file.path),
            pipeline=job.pipeline,
            step=job.step,
            attempts=job.attempts,
            error=error,
            next=f"retrying in {delay:.0f} s",
        )
        await self.store.release(job, next_attempt_at=time.time() + delay, error=error, error_code=code)
        return self._tell(Outcome(job, State.PENDING, error, code))

    async def _give_up(self, pipeline: Pipeline, job: Job, error: str, code: str, *, count: bool) -> Outcome:
        """Fail the job for good, at the step it stopped at: the pipeline records what it knows."""
        if count:
            job.attempts += 1
        log.error(
            "job.failed",
            path=display(job.file.path),
            pipeline=job.pipeline,
            step=job.step,
            attempts=job.attempts,
            error=error,
            next="nothing until the file changes or `watcher retry` is run",
        )
        try:
            await pipeline.give_up(job, error)
        except LeaseLost:
            raise
        except Exception:
            log.exception("job.give_up_failed", path=display(job.file.path), pipeline=job.pipeline)
        await self.store.release(job, state=State.FAILED, error=error, error_code=code)
        return self._tell(Outcome(job, State.FAILED, error, code))

    def _tell(self, outcome: Outcome) -> Outcome:
        self.on_outcome(outcome)
        return outcome
