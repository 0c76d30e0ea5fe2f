"""Back-fill: work a config change added (the archive turned on, a model, a version) for files already processed.

A start or a reload calls :func:`find` with the new settings: every current revision in the configured folders
that lacks a pipeline's job gets one, and every finished job that did less than the config now asks (a model
not stored for its content, a version it did not deliver) is reopened. Paid answers already in the store are
reused by the pipelines, so only the new work is asked (and passes the gate and the daily caps like any other).
:func:`price` tells its audio minutes from the files' headers, for the confirmation threshold.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from watcher.config import Settings
from watcher.fsutil import read_json_object, write_json_atomic
from watcher.media import audio_info
from watcher.store import Job, State, Step

FIRST_STEPS = {"analyze": Step.ANALYZE, "archive": Step.CHECK}
RECORD = "backfill.json"  # in state_dir: what the config asked when the store last caught up (see :func:`asked`)
PIPELINE_SERVICE = {"analyze": "analysis", "archive": "processing"}


PAGE_FILES = 1000  # revisions whose jobs one store call answers: memory stays bounded however many files there are


class BackfillStore(Protocol):
    """What :func:`find` and :func:`apply` ask of the store."""

    def current_jobs_after(self, file_id: int, files: int) -> list[Job]: ...

    def stored_models(self, sha256s: Sequence[str], backend: str) -> dict[str, set[str]]: ...

    def add_jobs(self, file_ids: Sequence[int], pipeline: str, step: Step) -> int: ...

    def reopen(self, job_ids: Sequence[int], step: Step) -> int: ...


@dataclass
class Backfill:
    """What a config change added for files already there: jobs to add, jobs to reopen, and why."""

    add: dict[str, list[int]] = field(default_factory=dict)  # pipeline -> file ids without a job of it
    reopen: dict[str, list[int]] = field(default_factory=dict)  # pipeline -> done job ids that did less
    paths: dict[str, set[str]] = field(default_factory=dict)  # pipeline -> the files concerned
    reasons: dict[str, int] = field(default_factory=dict)  # "archive turned on" -> files

    @property
    def jobs(self) -> int:
        return sum(map(len, self.add.values())) + sum(map(len, self.reopen.values()))

    def all_paths(self) -> list[str]:
        return sorted(set().union(*self.paths.values())) if self.paths else []

    def describe(self) -> str:
        return "; ".join(f"{why}: {n} file(s)" for why, n in self.reasons.items()) or "nothing"

    def _note(self, pipeline: str, why: str, path: str) -> None:
        self.paths.setdefault(pipeline, set()).add(path)
        self.reasons[why] = self.reasons.get(why, 0) + 1


def find(
    settings: Settings,
    store: BackfillStore,
    *,
    pipelines: Sequence[str],
    analysis_key: str,
    since: Mapping[str, Sequence[str]] | None = None,
    exists: Callable[[str], bool] = os.path.exists,
    page: int = PAGE_FILES,
) -> Backfill:
    """Every current revision in the configured folders that lacks work ``pipelines`` now ask for (see module).

    ``since``: the work the config asked for when the store last caught up (:func:`asked`); only models and
    versions added since then reopen finished jobs (a backend switched meanwhile does not re-analyse all).
    The store is read ``page`` revisions at a time, in file ID order (the plan's lists keep that order)."""
    folders = {str(f.path) for f in settings.folders}
    plan = Backfill()
    now = asked(settings)
    models = [m for m in now["models"] if since is None or m not in since.get("models", [])]
    wanted = [v for v in now["versions"] if since is None or v not in since.get("versions", [])]
    for by_file in _pages(store, page):
        jobs = {
            file_id: mine
            for file_id, mine in by_file.items()
            if mine[0].file.folder in folders and not any(j.state == State.GONE for j in mine)
        }
        done = [j.file.sha256 or "" for mine in jobs.values() for j in mine if _analysed(j)]
        stored = store.stored_models(done, analysis_key) if models and done else {}
        for file_id, mine in jobs.items():
            path = mine[0].file.path
            if exists(path):  # else deleted meanwhile: detection marks it gone
                _owed(plan, file_id, path, {j.pipeline: j for j in mine}, pipelines, models, wanted, stored)
    return plan


def _owed(
    plan: Backfill,
    file_id: int,
    path: str,
    mine: Mapping[str, Job],
    pipelines: Sequence[str],
    models: Sequence[str],
    wanted: Sequence[str],
    stored: Mapping[str, set[str]],
) -> None:
    """Note in ``plan`` what one revision (``mine``: its jobs by pipeline) is owed: a job of a pipeline turned on,
    or a done job reopened for ``models`` its content has no result of (``stored``) or ``wanted`` versions."""
    for pipeline in pipelines:
        job = mine.get(pipeline)
        if job is None:
            plan.add.setdefault(pipeline, []).append(file_id)
            plan._note(pipeline, f"{pipeline} turned on", path)
        elif pipeline == "analyze" and _analysed(job) and models:
            new = [m for m in models if m not in stored.get(job.file.sha256 or "", set())]
            if new:
                plan.reopen.setdefault(pipeline, []).append(job.id)
                plan._note(pipeline, f"model {', '.join(new)} added", path)
        elif job.state == State.DONE and pipeline == "archive" and wanted:
            new = [v for v in wanted if v not in (job.data.get("versions") or {})]
            if new:
                plan.reopen.setdefault(pipeline, []).append(job.id)
                plan._note(pipeline, f"version {', '.join(new)} added", path)


def _analysed(job: Job) -> bool:
    """A done analysis of known content (its stored models decide what a model added owes it)."""
    return job.pipeline == "analyze" and job.state == State.DONE and bool(job.file.sha256)


def _pages(store: BackfillStore, page: int) -> Iterator[dict[int, list[Job]]]:
    """The current revisions' jobs by file ID, ``page`` revisions per store call (never all of them at once)."""
    after = 0
    while jobs := store.current_jobs_after(after, page):
        by_file: dict[int, list[Job]] = {}
        for job in jobs:
            by_file.setdefault(job.file.id, []).append(job)
        yield by_file
        after = jobs[-1].file.id


def asked(settings: Settings) -> dict[str, list[str]]:
    """The work these settings ask for, as a start or reload records it once the store has caught up."""
    pipelines = (["analyze"] if settings.analysis.enabled else []) + (["archive"] if settings.archive.enabled else [])
    return {
        "pipelines": pipelines,
        "models": list(settings.analysis.models) if settings.analysis.enabled else [],
        "versions": list(settings.archive.wanted()) if settings.archive.enabled else [],
        "folders": [str(f.path) for f in settings.folders],
    }


def recorded(settings: Settings) -> dict[str, Any] | None:
    """What the config asked when the store last caught up (None: never recorded, so everything is checked)."""
    return read_json_object(settings.state_dir / RECORD)


def record(settings: Settings) -> None:
    """The store has caught up with what these settings ask: a later start checks old files only if it asks more."""
    write_json_atomic(settings.state_dir / RECORD, asked(settings))


def covered(now: Mapping[str, Sequence[str]], before: Mapping[str, Any] | None) -> bool:
    """Whether ``before`` (recorded) asked for all that ``now`` asks: then nothing can be owed to old files."""
    if before is None:
        return False
    return all(set(values) <= set(before.get(key) or []) for key, values in now.items())


def price(plan: Backfill, *, paid: Sequence[str]) -> dict[str, Any]:
    """Audio minutes the back-fill sends to each paid service (``paid``: the pipelines that pay), from the files'
    headers (a file whose length cannot be read counts as unknown), and their total."""
    minutes: dict[str, float] = {}
    unknown = 0
    for pipeline, paths in plan.paths.items():
        if pipeline not in paid:
            continue
        service = PIPELINE_SERVICE.get(pipeline, pipeline)
        for path in paths:
            seconds = audio_info(path).duration
            if seconds is None:
                unknown += 1
                continue
            minutes[service] = minutes.get(service, 0.0) + seconds / 60
    rounded = {s: round(m, 4) for s, m in minutes.items()}
    return {"minutes": rounded, "total_minutes": round(sum(minutes.values()), 4), "unknown_duration": unknown}


def apply(store: BackfillStore, plan: Backfill) -> int:
    """Queue the back-fill: add the missing jobs, reopen the ones that did less; how many jobs."""
    n = 0
    for pipeline, file_ids in plan.add.items():
        n += store.add_jobs(file_ids, pipeline, FIRST_STEPS[pipeline])
    for pipeline, job_ids in plan.reopen.items():
        n += store.reopen(job_ids, FIRST_STEPS[pipeline])
    return n
