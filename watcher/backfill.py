"""Back-fill: work a config change added (the archive turned on, a model, a version) for files already processed.

A start or a reload calls :func:`find` with the new settings: every current revision in the configured folders
that lacks a pipeline's job gets one, and every finished job that did less than the config now asks (a model
not stored for its content, a version it did not deliver) is reopened. Paid answers already in the store are
reused by the pipelines, so only the new work is asked (and passes the gate and the daily caps like any other).
:func:`price` tells its audio minutes from the files' headers, for the confirmation threshold.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from watcher.config import Settings
from watcher.fsutil import read_json_object, write_json_atomic
from watcher.media import audio_info
from watcher.store import Job, State, Step, StoredResult

FIRST_STEPS = {"analyze": Step.ANALYZE, "archive": Step.CHECK}
RECORD = "backfill.json"  # in state_dir: what the config asked when the store last caught up (see :func:`asked`)
PIPELINE_SERVICE = {"analyze": "analysis", "archive": "processing"}


class BackfillStore(Protocol):
    def jobs_of_current(self) -> list[Job]: ...

    def results_for(self, sha256: str, backend: str) -> dict[str, StoredResult]: ...

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
) -> Backfill:
    """Every current revision in the configured folders that lacks work ``pipelines`` now ask for (see module).

    ``since``: the work the config asked for when the store last caught up (:func:`asked`); only models and
    versions added since then reopen finished jobs (a backend switched meanwhile does not re-analyse all)."""
    folders = {str(f.path) for f in settings.folders}
    by_file: dict[int, list[Job]] = {}
    for each in store.jobs_of_current():
        if each.file.folder in folders:
            by_file.setdefault(each.file.id, []).append(each)
    plan = Backfill()
    now = asked(settings)
    models = [m for m in now["models"] if since is None or m not in since.get("models", [])]
    wanted = [v for v in now["versions"] if since is None or v not in since.get("versions", [])]
    for file_id, jobs in by_file.items():
        if any(j.state == State.GONE for j in jobs):
            continue
        path = jobs[0].file.path
        if not exists(path):
            continue  # deleted meanwhile: detection marks it gone
        mine = {j.pipeline: j for j in jobs}
        for pipeline in pipelines:
            job = mine.get(pipeline)
            if job is None:
                plan.add.setdefault(pipeline, []).append(file_id)
                plan._note(pipeline, f"{pipeline} turned on", path)
            elif job.state == State.DONE and pipeline == "analyze" and job.file.sha256 and models:
                stored = store.results_for(job.file.sha256, analysis_key)
                new = [m for m in models if m not in stored]
                if new:
                    plan.reopen.setdefault(pipeline, []).append(job.id)
                    plan._note(pipeline, f"model {', '.join(new)} added", path)
            elif job.state == State.DONE and pipeline == "archive" and wanted:
                new = [v for v in wanted if v not in (job.data.get("versions") or {})]
                if new:
                    plan.reopen.setdefault(pipeline, []).append(job.id)
                    plan._note(pipeline, f"version {', '.join(new)} added", path)
    return plan


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
