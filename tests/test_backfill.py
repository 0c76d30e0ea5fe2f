"""The back-fill's plan (watcher.backfill.find) on every store adapter: read a page of revisions at a time, never
every job at once, and the same plan whatever the page size."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from watcher import backfill
from watcher.config import AnalysisConfig, ArchiveConfig, FolderConfig, Settings
from watcher.store import Job, State, Step, StoredResult

KEY = "remote-test"
SINCE = {"pipelines": ["analyze"], "models": ["key"], "versions": ["original"]}


def _settings(tmp_path: Path, inbox: Path) -> Settings:
    return Settings(
        state_dir=tmp_path / "state",
        folders=(FolderConfig(path=inbox),),
        analysis=AnalysisConfig(api_key="k", models=("key", "bpm_degara")),
        archive=ArchiveConfig(
            enabled=True, api_key="k", output_dir=tmp_path / "out", versions=("original", "mastered")
        ),
    )


def _record(store: Any, folder: Path, name: str, jobs: Sequence[str], *, on_disk: bool = True, size: int = 10) -> int:
    path = folder / name
    if on_disk:
        path.write_bytes(b"x" * size)
    first = {"analyze": Step.ANALYZE, "archive": Step.CHECK}
    file_id, _ = store.register_revision(
        folder=str(folder),
        path=str(path),
        rel_path=name,
        size=size,
        mtime_ns=size,
        inode=size,
        jobs=[(p, first[p]) for p in jobs],
        now=100.0,
    )
    return int(file_id)


def _end(store: Any, pipeline: str, ends: dict[str, tuple[State, dict[str, Any]]]) -> None:
    """Claim every due job of ``pipeline`` and end it as ``ends`` says for its file's name (else leave it due)."""
    claimed = []
    while (job := store.claim(pipeline, "w")) is not None:
        claimed.append(job)
    for job in claimed:
        state, data = ends.get(Path(job.file.path).name, (State.PENDING, {}))
        if data:
            store.commit(job, **data)
        store.release(job, state=state)


def _fill(store: Any, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """Revisions of every kind the back-fill tells apart; (the configured folder, the plan expected of them)."""
    inbox, elsewhere = tmp_path / "inbox", tmp_path / "elsewhere"
    inbox.mkdir()
    elsewhere.mkdir()
    ids: dict[str, int] = {}
    for n in range(6):  # analysed only: the archive turned on owes each an archive job
        ids[f"a{n}.wav"] = _record(store, inbox, f"a{n}.wav", ["analyze"])
    for n in range(4):  # both pipelines: the archive done with "original" only owes "mastered"
        ids[f"b{n}.wav"] = _record(store, inbox, f"b{n}.wav", ["analyze", "archive"])
    ids["gone.wav"] = _record(store, inbox, "gone.wav", ["analyze"])
    _record(store, inbox, "deleted.wav", ["analyze"], on_disk=False)
    _record(store, elsewhere, "other.wav", ["analyze"])
    _record(store, inbox, "changed.wav", ["analyze"], size=10)
    ids["changed.wav"] = _record(store, inbox, "changed.wav", ["analyze"], size=20)  # the current revision
    for name in ("a0.wav", "a1.wav", "a2.wav", "b0.wav", "b1.wav"):
        store.set_sha256(ids[name], name)
        store.save_result(name, KEY, StoredResult("key", "key", "1", None, {"key": ["C"]}))
    store.save_result("a1.wav", KEY, StoredResult("bpm_degara", "bpm_degara", "1", None, {"bpm": 120}))
    done: tuple[State, dict[str, Any]] = (State.DONE, {})
    _end(store, "analyze", {"a0.wav": done, "a1.wav": done, "b0.wav": done, "b1.wav": done, "a3.wav": done,
                            "gone.wav": (State.GONE, {})})  # fmt: skip
    one, both = {"original": "o.wav"}, {"original": "o.wav", "mastered": "m.wav"}
    _end(store, "archive", {"b0.wav": (State.DONE, {"versions": one}), "b1.wav": (State.DONE, {"versions": both}),
                            "b2.wav": (State.DONE, {"versions": one})})  # fmt: skip
    jobs = {(Path(j.file.path).name, j.pipeline): j.id for j in store.jobs_of_current()}
    added = ["a0.wav", "a1.wav", "a2.wav", "a3.wav", "a4.wav", "a5.wav", "changed.wav"]
    # a1 has both models; a2 is not done; a3 is done but its content unknown: none of them is reopened
    reopened = {
        "analyze": [jobs["a0.wav", "analyze"], jobs["b0.wav", "analyze"], jobs["b1.wav", "analyze"]],
        "archive": [jobs["b0.wav", "archive"], jobs["b2.wav", "archive"]],
    }
    expected = {
        "add": {"archive": [ids[n] for n in added]},
        "reopen": reopened,
        "paths": {
            "archive": {str(inbox / n) for n in [*added, "b0.wav", "b2.wav"]},
            "analyze": {str(inbox / n) for n in ["a0.wav", "b0.wav", "b1.wav"]},
        },
        "reasons": {"archive turned on": 7, "model bpm_degara added": 3, "version mastered added": 2},
    }
    return inbox, expected


class Spy:
    """The store as :func:`backfill.find` may use it (no call for every job at once), counting each page."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.pages: list[int] = []  # revisions per answer

    def current_jobs_after(self, file_id: int, files: int) -> list[Job]:
        jobs: list[Job] = self.store.current_jobs_after(file_id, files)
        self.pages.append(len({j.file.id for j in jobs}))
        return jobs

    def stored_models(self, sha256s: Sequence[str], backend: str) -> dict[str, set[str]]:
        return dict(self.store.stored_models(sha256s, backend))

    def add_jobs(self, file_ids: Sequence[int], pipeline: str, step: Step) -> int:
        return int(self.store.add_jobs(file_ids, pipeline, step))

    def reopen(self, job_ids: Sequence[int], step: Step) -> int:
        return int(self.store.reopen(job_ids, step))


def test_the_plan_is_the_same_whatever_the_page(store, tmp_path):
    """Pages of 1, 2, 5 revisions and one page of all give one plan: files outside the folders, deleted, gone or
    replaced are left out, a pipeline turned on adds its job, a model or version added reopens a done job only
    where it is missing; the store is asked one page at a time, never for more revisions than the page holds."""
    inbox, expected = _fill(store, tmp_path)
    settings = _settings(tmp_path, inbox)
    for page in (1, 2, 5, 1000):
        spy = Spy(store)
        plan = backfill.find(
            settings, spy, pipelines=["analyze", "archive"], analysis_key=KEY, since=SINCE, page=page
        )
        got = {"add": plan.add, "reopen": plan.reopen, "paths": plan.paths, "reasons": plan.reasons}
        assert got == expected, page
        assert max(spy.pages) <= page and spy.pages[-1] == 0
        assert sum(spy.pages) == 14  # every current revision with jobs, each once (the replaced one is not)
        assert len(spy.pages) == -(-14 // page) + 1
    assert backfill.apply(Spy(store), plan) == 12
    again = backfill.find(settings, store, pipelines=["analyze", "archive"], analysis_key=KEY, since=SINCE, page=3)
    assert again.add == {} and again.reopen == {}  # queued: nothing is owed twice


def test_a_run_of_revisions_without_jobs_does_not_end_the_pages(store, tmp_path):
    """Revisions recorded while no pipeline ran have no jobs: more of them in a row than a page holds must not
    read as the end (the files after them are still planned)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for n in range(5):
        _record(store, inbox, f"none{n}.wav", [])
    last = _record(store, inbox, "last.wav", ["analyze"])
    plan = backfill.find(_settings(tmp_path, inbox), store, pipelines=["analyze", "archive"], analysis_key=KEY,
                         since=SINCE, page=2)  # fmt: skip
    assert plan.add == {"archive": [last]}


@pytest.mark.parametrize("files", [0, 3])
def test_a_page_answers_in_file_order_and_never_splits_a_revision(store, tmp_path, files):
    """The store's page: the jobs of the next revisions after an ID, in ID order, both of a file's jobs in one."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    made = [_record(store, inbox, f"f{n}.wav", ["analyze", "archive"]) for n in range(files)]
    first = store.current_jobs_after(0, 2)
    assert [(j.file.id, j.pipeline) for j in first] == [(f, p) for f in made[:2] for p in ("analyze", "archive")]
    rest = store.current_jobs_after(first[-1].file.id, 2) if first else []
    assert [j.file.id for j in rest] == [f for f in made[2:] for _ in range(2)]
