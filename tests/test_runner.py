"""The runner, alone: one scheduler over a real store, with scripted pipelines that fail in every way.

Each test registers files, lets the runner drain what is due, and reads the store's verdict: attempts counted
once and only for failures, every error by its scope, the pipeline's give_up called once, a superseded job's
late result dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from watcher.config import RetryConfig
from watcher.errors import BadInput, Deferred, FileChanged, InDoubt, NeedsUser, Rejected, RetryLater
from watcher.pipelines.base import StepResult
from watcher.runner import Outcome, Runner
from watcher.store import Job, Store
from watcher.store.aio import AsyncStore

RETRY = RetryConfig(backoff_initial=0.01, backoff_max=0.02, max_attempts=4, needs_user_backoff=60)


class Scripted:
    """A pipeline whose every run calls ``act(job)``: return a StepResult or raise."""

    def __init__(self, name: str, act: Callable[[Job], StepResult], service: str | None = None) -> None:
        self.name = name
        self.first_step = "one"
        self.service = service
        self.act = act
        self.runs = 0
        self.gave_up: list[str] = []

    async def run(self, job: Job) -> StepResult:
        self.runs += 1
        return self.act(job)

    async def give_up(self, job: Job, error: str) -> None:
        self.gave_up.append(error)


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "w.db")
    yield s
    s.close()


def add(store: Store, name: str, pipelines: tuple[str, ...] = ("p",)) -> int:
    file_id, _ = store.register_revision(
        folder="/in",
        path=f"/in/{name}",
        rel_path=name,
        size=1,
        mtime_ns=1,
        inode=hash(name) % 10_000,
        jobs=[(p, "one") for p in pipelines],
    )
    return file_id


def drain(store: Store, *pipelines: Scripted, **kw: Any) -> list[Outcome]:
    outcomes: list[Outcome] = []

    async def go() -> None:
        aio = AsyncStore(store)
        runner = Runner(
            aio, {p.name: p for p in pipelines}, concurrency={}, retry=RETRY, on_outcome=outcomes.append, **kw
        )
        try:
            await asyncio.wait_for(runner.drain(horizon=1.0), 20)
        finally:
            await aio.aclose(close_store=False)

    asyncio.run(go())
    return outcomes


def job_of(store: Store, file_id: int) -> Job:
    (job,) = store.jobs_of_file(file_id)
    return job


def test_steps_advance_without_counting_attempts(store):
    """A scheduled next step is progress: the job comes back at that step, its attempts untouched."""

    def act(job: Job) -> StepResult:
        return StepResult("done") if job.step == "two" else StepResult.later("two", time.time())

    pipeline = Scripted("p", act)
    fid = add(store, "a.wav")
    outcomes = drain(store, pipeline)
    assert pipeline.runs == 2 and [o.state for o in outcomes] == ["pending", "done"]
    assert (job_of(store, fid).state, job_of(store, fid).attempts) == ("done", 0)


def test_transient_failures_back_off_then_fail_with_give_up_once(store):
    """RetryLater is retried until max_attempts; then the job fails once and its pipeline records why."""

    def act(job: Job) -> StepResult:
        raise RetryLater("the service timed out")

    pipeline = Scripted("p", act)
    fid = add(store, "a.wav")
    drain(store, pipeline)
    job = job_of(store, fid)
    assert (job.state, job.attempts, job.error_code) == ("failed", RETRY.max_attempts, "retry_later")
    assert pipeline.runs == RETRY.max_attempts and pipeline.gave_up == ["the service timed out"]


def test_a_refused_file_gets_three_attempts_and_a_final_one_fails_at_once(store):
    """Rejected (the service's word on this file) is retried 3 times; a final BadInput fails on the first run."""
    refused = Scripted("p", lambda job: (_ for _ in ()).throw(Rejected("HTTP 422: bad sample rate", status=422)))
    final = Scripted("q", lambda job: (_ for _ in ()).throw(BadInput("the content is not audio")))
    a, b = add(store, "a.wav", ("p",)), add(store, "b.wav", ("q",))
    drain(store, refused, final)
    assert (job_of(store, a).state, job_of(store, a).attempts, refused.runs) == ("failed", 3, 3)
    assert "HTTP 422" in (job_of(store, a).last_error or "")
    assert (job_of(store, b).state, job_of(store, b).attempts, final.runs) == ("failed", 0, 1)
    assert final.gave_up == ["the content is not audio"]


def test_an_account_problem_pauses_that_service_only(store):
    """NeedsUser pauses the pipelines of that service; a pipeline of another service goes on."""
    blocked = Scripted("p", lambda job: (_ for _ in ()).throw(NeedsUser("401", status=401)), service="analysis")
    other = Scripted("q", lambda job: StepResult("done"), service="processing")
    for n in range(3):
        add(store, f"{n}.wav", ("p", "q"))
    drain(store, blocked, other)
    assert blocked.runs == 1, "the paused service was not asked again"
    assert other.runs == 3
    assert store.counts() == {"p": {"pending": 3}, "q": {"done": 3}}


def test_waiting_counts_no_attempt_and_in_doubt_is_held(store):
    """Deferred reschedules without an attempt; InDoubt holds the job with what the user needs to retry it."""
    until = time.time() + 3600

    def act(job: Job) -> StepResult:
        if job.file.rel_path == "a.wav":
            raise Deferred("another copy is being sent", until=until)
        raise InDoubt("answer lost", operation="master", since=123.0, keys=[["s", "svc", "master", "p"]])

    pipeline = Scripted("p", act)
    a, b = add(store, "a.wav"), add(store, "b.wav")
    drain(store, pipeline)
    waiting, held = job_of(store, a), job_of(store, b)
    assert (waiting.state, waiting.attempts, waiting.error_code) == ("pending", 0, "waiting")
    assert (held.state, held.error_code, held.data["in_doubt"]["operation"]) == ("in_doubt", "in_doubt", "master")
    assert store.next_due("p") == pytest.approx(until)
    assert store.retry(in_doubt=True) == 1 and job_of(store, b).state == "pending"


def test_a_routine_deferral_is_no_problem_to_show(store):
    """A status poll waiting for its turn (routine pacing) is rescheduled with no attempt and no error, so
    `watcher status` and the web page do not list it; an earlier error of the job is cleared."""
    until = time.time() + 3600
    turns = iter([RetryLater("service hiccup"), Deferred("polls at their share", until=until, routine=True)])

    def act(job: Job) -> StepResult:
        raise next(turns)

    a = add(store, "a.wav")
    drain(store, Scripted("p", act))
    job = job_of(store, a)
    assert (job.state, job.attempts, job.last_error, job.error_code) == ("pending", 1, None, None)
    assert store.next_due("p") == pytest.approx(until)
    assert store.problems() == []


def test_a_changed_file_is_superseded_and_hinted_again(store):
    """FileChanged ends the job as superseded and hands the path back to detection."""
    hinted: list[str] = []
    pipeline = Scripted("p", lambda job: (_ for _ in ()).throw(FileChanged("it grew")))
    fid = add(store, "a.wav")
    drain(store, pipeline, rehint=hinted.append)
    assert job_of(store, fid).state == "superseded" and hinted == ["/in/a.wav"]


def test_a_late_result_of_a_superseded_job_is_dropped(store):
    """A new revision arriving while a job runs: the old job's result changes nothing in the store."""

    def act(job: Job) -> StepResult:
        store.register_revision(
            folder="/in", path="/in/a.wav", rel_path="a.wav", size=2, mtime_ns=2, inode=1, jobs=[("p", "one")]
        )
        return StepResult("done") if job.file.size == 1 else StepResult("skipped")

    pipeline = Scripted("p", act)
    old = add(store, "a.wav")
    outcomes = drain(store, pipeline)
    assert job_of(store, old).state == "superseded"
    assert [o.state for o in outcomes] == ["skipped"], "the late result was told to nobody"


def test_an_unexpected_exception_is_retried_as_internal(store):
    """A bug in a pipeline is logged with its traceback and retried; it never stops the runner."""
    calls = {"n": 0}

    def act(job: Job) -> StepResult:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("oops")
        return StepResult("done")

    fid = add(store, "a.wav")
    drain(store, Scripted("p", act))
    job = job_of(store, fid)
    assert (job.state, job.attempts) == ("done", 1)


def test_idle_workers_leave_the_looking_to_one_lookout(store):
    """With 40 idle workers only one looks at the store on a timer; work added behind the runner's back (another
    node, `watcher retry`) is still found by it, and the other workers join in once it finds some."""
    claims: list[str] = []
    done: list[str] = []
    looked, finished = asyncio.Event(), asyncio.Event()
    aio = AsyncStore(store)
    real_claim = aio.claim

    async def claim(*args: Any, **kwargs: Any) -> Job | None:
        task = asyncio.current_task()
        claims.append(task.get_name() if task else "?")
        if len(claims) >= 40 + 30:  # a claim per worker at start, then 30 idle looks
            looked.set()
        return await real_claim(*args, **kwargs)

    def act(job: Job) -> StepResult:
        done.append(job.file.rel_path)
        if len(done) == 5:
            finished.set()
        return StepResult("done")

    aio.claim = claim  # type: ignore[method-assign]

    async def go() -> None:
        runner = Runner(aio, {"p": Scripted("p", act)}, concurrency={"p": 40}, retry=RETRY, look_every=(0.01, 0.02))
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        await asyncio.wait_for(looked.wait(), 10)
        idle_looks = set(claims[40:70])
        for n in range(5):  # added without waking the runner, as another process would
            add(store, f"late-{n}.wav")
        await asyncio.wait_for(finished.wait(), 10)
        stop.set()
        await asyncio.wait_for(task, 10)
        assert len(idle_looks) == 1, f"idle looks came from {sorted(idle_looks)}"
        await aio.aclose(close_store=False)

    asyncio.run(go())
    assert sorted(done) == [f"late-{n}.wav" for n in range(5)]
