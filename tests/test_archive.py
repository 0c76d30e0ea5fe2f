"""The archive pipeline end to end: the daemon, real folders, the processing emulator and its storage host."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import jsonschema
import pytest
from pydantic import SecretStr

from tests.conftest import API_KEY, make_settings, query, wait_for, write_tone
from watcher.config import ArchiveConfig
from watcher.emulator import Emulator
from watcher.pipelines.sidecar import schema
from watcher.status import collect, render
from watcher.store import Store

pytestmark = pytest.mark.timeout(90)
PKEY = "processing-key-77c1"
PAID = ["POST /from-file", "POST /upscale-audio", "POST /master-audio", "POST /create-stems"]


@pytest.fixture
def emu():
    with Emulator(analysis_key=API_KEY, processing_key=PKEY, use_local=False) as e:
        e.processing.faults.polls_needed = 1
        yield e


def archive_settings(tmp_path: Path, inbox: Path, emu: Emulator, **archive):
    archive.setdefault("versions", ("original", "restored", "mastered", "mastered_stems"))
    cfg = ArchiveConfig(
        enabled=True,
        base_url=emu.url,
        api_key=PKEY,
        output_dir=tmp_path / "out",
        poll_initial=0.05,
        poll_max=0.2,
        **archive,
    )
    return make_settings(tmp_path, inbox, emu.url).model_copy(update={"archive": cfg})


def delivered(tmp_path: Path, name: str) -> Path:
    return tmp_path / "out" / name


def wait_delivery(tmp_path: Path, name: str, timeout: float = 30) -> dict:
    folder = delivered(tmp_path, name)
    wait_for(lambda: (folder / "manifest.json").exists(), timeout=timeout, what=f"delivery of {name}")
    return json.loads((folder / "manifest.json").read_text())


def job_state(tmp_path: Path, pipeline: str = "archive") -> tuple[str | None, dict]:
    """The state and data of the newest job of a pipeline."""
    row = query(tmp_path, "SELECT state, data FROM jobs WHERE pipeline=? ORDER BY id DESC", pipeline)
    return (row[0], json.loads(row[1])) if row else (None, {})


def test_clean_run_delivers_every_version(tmp_path, inbox, emu, run_daemon):
    """Tracks and stems land verified in <output>/<name>/ with a manifest; each paid call is made once."""
    d = run_daemon(archive_settings(tmp_path, inbox, emu))
    write_tone(inbox / "album" / "Song One.wav", 0.5)
    manifest = wait_delivery(tmp_path, "album/Song One")
    wait_for(lambda: job_state(tmp_path)[0] == "done")
    wait_for(lambda: (inbox / "album" / "Song One.wav.analysis.json").exists())
    d.stop()
    folder = delivered(tmp_path, "album/Song One")
    assert manifest["versions"] == ["mastered", "mastered_stems", "original", "restored"]
    for f in manifest["files"]:
        assert (folder / f["path"]).stat().st_size == f["size"]
        assert f["service_ids"]["audio_id"] == manifest["ids"]["audio"]
    stems = [f for f in manifest["files"] if f["version"] == "mastered_stems"]
    assert sorted(Path(f["path"]).name for f in stems) == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]
    assert all(f["path"].startswith("stems/") for f in stems)
    counts = emu.api.counts()
    assert [counts[r] for r in PAID] == [1, 1, 1, 1]
    assert counts["POST /download-archive"] == 2  # one for the tracks, one for the stems
    assert all("x-api-key" not in {k.lower() for k in r.headers} for r in emu.storage.requests)
    assert len(emu.storage.requests) == 2
    doc = json.loads((inbox / "album" / "Song One.wav.analysis.json").read_text())
    jsonschema.validate(doc, schema())
    assert doc["archive"]["audio_id"] == manifest["ids"]["audio"]
    assert doc["archive"]["delivery"] == str(folder)
    assert doc["complete"] is True  # the analysis half is there too
    assert not list((tmp_path / "out").rglob(".watcher-tmp-*"))
    store = Store(tmp_path / "state" / "watcher.db")
    try:
        text = render(collect(store, state_dir="state"))
    finally:
        store.close()
    assert "archive: done [original: delivered, restored: delivered, mastered: delivered, " in text
    assert f"-> {folder}" in text


@pytest.mark.parametrize("stop_when", ["upload", "restore", "stems:mastered"])
def test_restart_after_each_step_never_pays_twice(tmp_path, inbox, emu, run_daemon, stop_when):
    """Killed (checkpoint-now) right after an ID was stored, then restarted: every paid call happened once."""
    emu.processing.faults.polls_needed = 4
    settings = archive_settings(tmp_path, inbox, emu)
    d = run_daemon(settings)
    write_tone(inbox / "take.wav", 0.3)
    wait_for(
        lambda: query(tmp_path, "SELECT 1 FROM operations WHERE operation=? AND state='answered'", stop_when),
        what=f"{stop_when} answered",
    )
    d.stop(force=True)
    d2 = run_daemon(settings)
    wait_delivery(tmp_path, "take")
    d2.stop()
    counts = emu.api.counts()
    assert [counts[r] for r in PAID] == [1, 1, 1, 1]


def test_failed_version_does_not_block_the_others(tmp_path, inbox, emu, run_daemon):
    """is_failed on mastering: its error is recorded, mastered stems fail with it, the rest is delivered."""
    emu.processing.faults.failed_kinds = {"mastered"}
    d = run_daemon(archive_settings(tmp_path, inbox, emu))
    write_tone(inbox / "x.wav", 0.3)
    manifest = wait_delivery(tmp_path, "x")
    wait_for(lambda: job_state(tmp_path)[0] == "done")
    d.stop()
    assert manifest["versions"] == ["original", "restored"]
    _, data = job_state(tmp_path)
    assert data["versions"]["mastered"] == "failed: emulated failure of mastered"
    assert data["versions"]["mastered_stems"].startswith("failed")
    assert data["versions"]["original"] == "delivered"
    assert emu.api.counts()["POST /create-stems"] == 0


def test_email_queued_archive_is_fetched_object_by_object(tmp_path, inbox, emu, run_daemon):
    """No zip now (e-mail later): every version comes through GET /download/{type}/{id} instead."""
    emu.processing.faults.email_queued = 2
    d = run_daemon(archive_settings(tmp_path, inbox, emu))
    write_tone(inbox / "y.wav", 0.3)
    manifest = wait_delivery(tmp_path, "y")
    d.stop()
    assert manifest["versions"] == ["mastered", "mastered_stems", "original", "restored"]
    assert emu.api.counts()["GET /download"] == 3 + 4  # three tracks and four stems
    assert all("x-api-key" not in {k.lower() for k in r.headers} for r in emu.storage.requests)


def test_incomplete_archive_is_completed_singly(tmp_path, inbox, emu, run_daemon):
    """archive_incomplete: the file the zip skipped is fetched on its own."""
    emu.processing.faults.archive_incomplete = 1
    d = run_daemon(archive_settings(tmp_path, inbox, emu, versions=("original", "mastered")))
    write_tone(inbox / "z.wav", 0.3)
    manifest = wait_delivery(tmp_path, "z")
    d.stop()
    assert manifest["versions"] == ["mastered", "original"]
    assert emu.api.counts()["GET /download"] == 1


def test_expired_url_is_asked_again(tmp_path, inbox, emu, run_daemon):
    """Storage refusing a signed URL makes the client ask the API for a fresh one."""
    emu.processing.faults.expired_urls = 1
    d = run_daemon(archive_settings(tmp_path, inbox, emu, versions=("original",)))
    write_tone(inbox / "e.wav", 0.3)
    manifest = wait_delivery(tmp_path, "e")
    d.stop()
    assert manifest["versions"] == ["original"]
    assert emu.api.counts()["POST /download-archive"] == 2


@pytest.mark.parametrize("attack", ["dotdot", "absolute", "symlink", "oversized", "truncated"])
def test_bad_zip_leaves_nothing_behind(tmp_path, inbox, emu, run_daemon, attack):
    """An unsafe or broken zip fails the file with a clear reason; the output folder holds nothing of it."""
    emu.processing.faults.zip_attack = attack
    settings = archive_settings(tmp_path, inbox, emu, versions=("original",), max_archive_bytes=32 << 20)
    d = run_daemon(settings.model_copy(update={"retry": settings.retry.model_copy(update={"max_attempts": 1})}))
    write_tone(inbox / "evil.wav", 0.3)
    wait_for(lambda: job_state(tmp_path)[0] == "failed", what="archive failed")
    d.stop()
    store = Store(tmp_path / "state" / "watcher.db")
    try:
        (problem,) = [p for p in store.problems() if p.pipeline == "archive"]
    finally:
        store.close()
    expected = {
        "dotdot": "'..' in its path",
        "absolute": "absolute path",
        "symlink": "a link",
        "oversized": "more than the limit",
        "truncated": "not a zip file",
    }[attack]
    assert (problem.error or "").startswith("refused zip") and expected in (problem.error or ""), problem.error
    out = tmp_path / "out"
    assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))
    assert not (tmp_path / "escaped.wav").exists() and not Path("/srv/absolute.wav").exists()


def test_service_faults_are_retried(tmp_path, inbox, emu, run_daemon):
    """429 and 500 on polls and archive requests are retried; the file still gets every version once."""
    emu.processing.faults.status_429 = {"GET /status": 2, "POST /from-file": 1}
    emu.processing.faults.status_500 = {"POST /download-archive": 1, "GET /status": 1}
    d = run_daemon(archive_settings(tmp_path, inbox, emu, versions=("original", "mastered")))
    write_tone(inbox / "f.wav", 0.3)
    manifest = wait_delivery(tmp_path, "f")
    d.stop()
    assert manifest["versions"] == ["mastered", "original"]
    counts = emu.api.counts()
    assert counts["POST /from-file"] == 2  # the 429 was not processed, so it is sent again
    assert counts["POST /master-audio"] == 1


def test_newer_revision_keeps_the_older_delivery(tmp_path, inbox, emu, run_daemon):
    """A changed source is delivered again; the previous delivery is renamed aside, never overwritten."""
    d = run_daemon(archive_settings(tmp_path, inbox, emu, versions=("original",)))
    audio = write_tone(inbox / "v.wav", 0.3, freq=300)
    first = wait_delivery(tmp_path, "v")
    write_tone(audio, 0.4, freq=600)
    wait_for(
        lambda: (
            json.loads((delivered(tmp_path, "v") / "manifest.json").read_text())["source"]["sha256"]
            != first["source"]["sha256"]
        ),
        what="second delivery",
    )
    d.stop()
    kept = list((tmp_path / "out").glob("v.replaced-*"))
    assert len(kept) == 1
    assert json.loads((kept[0] / "manifest.json").read_text())["source"]["sha256"] == first["source"]["sha256"]


def test_analysis_failure_does_not_block_the_archive(tmp_path, inbox, emu, run_daemon):
    """With a refused analysis key the archive still delivers; the analysis waits, and nothing is sent to it but
    the key check (which bills nothing)."""
    settings = archive_settings(tmp_path, inbox, emu, versions=("original",))
    settings = settings.model_copy(
        update={"analysis": settings.analysis.model_copy(update={"api_key": None, "backend": "remote"})}
    )
    d = run_daemon(settings)
    write_tone(inbox / "a.wav", 0.3)
    wait_delivery(tmp_path, "a")
    wait_for(lambda: job_state(tmp_path, "analyze")[0] == "pending")
    info = d.daemon.info()
    d.stop()
    assert "key was refused" in info["paused_services"]["analysis"]
    assert emu.api.counts()["POST /v1/analysis/stream (key check)"] == 1
    assert emu.api.counts()["POST /v1/analysis/stream"] == 0
    assert not [op for (_, op) in emu.paid() if op.startswith("analyze:")]


def test_a_paid_call_refused_with_429_is_freed_and_retried_as_a_new_take(tmp_path, inbox, emu, run_daemon):
    """The upload meets 429 with Retry-After: it provably did nothing, so its operation is free again and its
    ledger line is not spent; the retry is not a loop below the gate but the job's next attempt, a new take
    (a second ledger line), and the service bills the upload once."""
    emu.processing.faults.status_429 = {"POST /from-file": 1}
    emu.processing.faults.retry_after = 0.5
    settings = archive_settings(tmp_path, inbox, emu)
    d = run_daemon(settings)
    write_tone(inbox / "take.wav", 0.3)
    wait_delivery(tmp_path, "take")
    d.stop()
    assert emu.api.counts()["POST /from-file"] == 2  # the refused one, then the one that was done
    assert emu.paid()[next(k for k in emu.paid() if k[1] == "upload")] == 1
    db = sqlite3.connect(tmp_path / "state" / "watcher.db")
    try:
        lines = db.execute("SELECT outcome FROM ledger WHERE operation='upload' ORDER BY id").fetchall()
    finally:
        db.close()
    assert lines == [("not_sent",), ("answered",)]


def test_a_new_processing_key_while_a_file_is_at_the_service_uploads_it_again_there(tmp_path, inbox, run_daemon):
    """A file waits at the service under key A; the daemon restarts with key B (another account): the file is
    uploaded to B's account and delivered, instead of failing for good with an internal IndexError (found from
    outside: the process step asked the plan's upload as if it were a stem split)."""
    with Emulator(analysis_key=API_KEY, processing_key=None, use_local=False) as emu:
        emu.processing.faults.polls_needed = 0
        emu.processing.faults.polls_by_kind = {"mastered": 1000}  # the master stays in progress under key A
        settings = archive_settings(tmp_path, inbox, emu, versions=("original", "mastered"))
        d = run_daemon(settings)
        write_tone(inbox / "take.wav", 0.5)
        wait_for(lambda: any(op == "master" for _, op in emu.paid()), what="the master billed under key A")
        d.stop()
        emu.processing.faults.polls_by_kind = {}
        other = settings.archive.model_copy(update={"api_key": SecretStr("processing-key-account-b")})
        d = run_daemon(settings.model_copy(update={"archive": other}))
        manifest = wait_delivery(tmp_path, "take")
        d.stop()
        assert {v["version"] for v in manifest["files"]} >= {"original", "mastered"}
        state, data = job_state(tmp_path)
        assert state == "done", data
        # each account billed once for the upload and once for the master; the bill check holds each to its ledger
        processing = sorted(op for _, op in emu.paid().elements() if not op.startswith("analyze:"))
        assert processing == ["master", "master", "upload", "upload"]
