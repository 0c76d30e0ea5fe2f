"""End to end: real folders, real watchdog events, the daemon, and the emulator on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import jsonschema
import pytest
from pydantic import SecretStr

from tests.conftest import API_KEY, make_settings, query, wait_for, write_silent_wav, write_tone
from watcher.config import service_identity
from watcher.pipelines.sidecar import schema
from watcher.store import Store
from watcher.store.aio import AsyncStore

pytestmark = pytest.mark.timeout(60)
ROUTE = "POST /v1/analysis/stream"


def sidecar_of(audio: Path) -> Path:
    return audio.with_name(audio.name + ".analysis.json")


def load_valid(path: Path) -> dict:
    doc = json.loads(path.read_text("utf-8"))
    jsonschema.validate(doc, schema())
    return doc


def test_dropped_file_gets_a_valid_sidecar(tmp_path, inbox, emulator, run_daemon):
    """A WAV copied into the folder gets a schema-valid sidecar with every requested model, from one request."""
    source = write_tone(tmp_path / "src" / "take 1.wav", 1.0)
    d = run_daemon(make_settings(tmp_path, inbox, emulator.url))
    shutil.copy(source, inbox / "take 1.wav")
    doc = load_valid(wait_for(lambda: (p := sidecar_of(inbox / "take 1.wav")).exists() and p, what="sidecar"))
    assert d.stop() == 0
    assert doc["complete"] is True
    assert doc["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert doc["source"]["size"] == source.stat().st_size
    assert doc["models_requested"] == ["key", "bpm_degara", "loudness-ebur128"]
    assert set(doc["models"]) == {"key", "bpm_degara", "loudness_ebur128"}  # keyed by the returned name
    assert doc["models"]["loudness_ebur128"]["requested"] == "loudness-ebur128"
    assert doc["backend"]["name"] == "remote"
    assert emulator.api.counts()[ROUTE] == 1
    assert API_KEY not in sidecar_of(inbox / "take 1.wav").read_text()


def test_same_content_is_never_sent_twice(tmp_path, inbox, emulator, run_daemon):
    """A second copy of analysed content, under another name, gets its sidecar from the store."""
    source = write_tone(tmp_path / "src" / "a.wav", 0.5)
    d = run_daemon(make_settings(tmp_path, inbox, emulator.url))
    shutil.copy(source, inbox / "a.wav")
    first = load_valid(wait_for(lambda: (p := sidecar_of(inbox / "a.wav")).exists() and p))
    shutil.copy(source, inbox / "copy of a.wav")
    second = load_valid(wait_for(lambda: (p := sidecar_of(inbox / "copy of a.wav")).exists() and p))
    d.stop()
    assert emulator.api.counts()[ROUTE] == 1
    assert second["models"] == first["models"]


def test_changed_file_is_analysed_again(tmp_path, inbox, emulator, run_daemon):
    """A file rewritten after its analysis is a new revision and gets a new sidecar."""
    d = run_daemon(make_settings(tmp_path, inbox, emulator.url))
    audio = write_tone(inbox / "mix.wav", 0.5, freq=440)
    first = load_valid(wait_for(lambda: (p := sidecar_of(audio)).exists() and p))
    write_tone(tmp_path / "v2.wav", 0.7, freq=660)
    shutil.copy(tmp_path / "v2.wav", audio)
    new_sha = hashlib.sha256(audio.read_bytes()).hexdigest()
    second = wait_for(lambda: (doc := load_valid(sidecar_of(audio)))["source"]["sha256"] == new_sha and doc)
    d.stop()
    assert first["source"]["sha256"] != new_sha
    assert second["complete"] is True
    assert emulator.api.counts()[ROUTE] == 2


def test_slow_writer_is_analysed_once_complete(tmp_path, inbox, emulator, run_daemon):
    """A file written in bursts over several settle windows is only analysed once, when complete."""
    settings = make_settings(tmp_path, inbox, emulator.url)
    d = run_daemon(settings)
    source = write_tone(tmp_path / "slow.wav", 2.0).read_bytes()
    target = inbox / "slow.wav"
    step = len(source) // 8
    with target.open("wb") as fh:
        for i in range(8):
            fh.write(source[i * step : (i + 1) * step])
            fh.flush()
            os.fsync(fh.fileno())
            # The writer pauses for longer than a check tick but shorter than the settle window.
            threading.Event().wait(0.15)  # sleep-ok: this is the slow writer's own pace, not a synchronisation
        fh.write(source[8 * step :])
    doc = load_valid(wait_for(lambda: (p := sidecar_of(target)).exists() and p))
    d.stop()
    assert doc["source"]["size"] == len(source)
    assert emulator.api.counts()[ROUTE] == 1
    assert emulator.analysis.bytes_received == len(source)


def test_non_audio_and_empty_files_are_reported_not_sent(tmp_path, inbox, emulator, run_daemon):
    """A text file named .wav fails with a clear reason, an empty file is skipped; neither reaches the service."""
    d = run_daemon(make_settings(tmp_path, inbox, emulator.url))
    (inbox / "notes.wav").write_text("this is not audio\n")
    (inbox / "empty.wav").write_bytes(b"")
    judged = "SELECT SUM(state='failed'), SUM(state='skipped') FROM jobs WHERE pipeline='analyze'"
    wait_for(lambda: query(tmp_path, judged) == (1, 1), what="both files settled and judged")
    d.stop()
    store = Store(tmp_path / "state" / "watcher.db")
    try:
        problems = {Path(p.path).name: p for p in store.problems()}
    finally:
        store.close()
    assert "not audio" in (problems["notes.wav"].error or "")
    assert problems["notes.wav"].error_code == "bad_input"
    assert emulator.api.counts()[ROUTE] == 0
    assert not sidecar_of(inbox / "notes.wav").exists()


def test_restart_mid_analysis_asks_no_model_twice(tmp_path, inbox, emulator, run_daemon):
    """Stopping after the first model answered and starting again requests only the missing models."""
    emulator.analysis.faults.event_delay = 0.4
    settings = make_settings(tmp_path, inbox, emulator.url)
    d = run_daemon(settings)
    write_tone(inbox / "long take.wav", 0.5)
    wait_for(lambda: (row := query(tmp_path, "SELECT COUNT(*) FROM results")) and row[0] >= 1, what="first model")
    assert d.stop(force=True) == 0
    assert not sidecar_of(inbox / "long take.wav").exists()
    store = Store(tmp_path / "state" / "watcher.db")
    content = hashlib.sha256((inbox / "long take.wav").read_bytes()).hexdigest()
    held = set(store.results_for(content, service_identity("analysis", emulator.url, SecretStr(API_KEY))))
    store.close()
    assert held and len(held) < 3
    emulator.analysis.faults.event_delay = 0.0
    d2 = run_daemon(settings)
    doc = load_valid(wait_for(lambda: (p := sidecar_of(inbox / "long take.wav")).exists() and p))
    d2.stop()
    first, second = emulator.analysis.models_requested
    assert first == ["key", "bpm_degara", "loudness-ebur128"]
    assert set(second) == set(first) - held, "the restart asked again for a model it already held"
    assert doc["complete"] is True


def test_file_modified_during_upload_is_not_trusted(tmp_path, inbox, emulator, run_daemon):
    """A file that grows while its bytes are being sent gets no sidecar for the old content; its new revision does."""
    emulator.analysis.faults.read_delay = 0.01
    settings = make_settings(tmp_path, inbox, emulator.url)
    d = run_daemon(settings)
    audio = write_silent_wav(tmp_path / "growing.wav", 24)
    audio = Path(shutil.move(audio, inbox / "growing.wav"))
    wait_for(lambda: emulator.analysis.bytes_arriving > 0, what="upload started")
    with audio.open("ab") as fh:
        fh.write(b"\0" * 4096)
    emulator.analysis.faults.read_delay = 0.0
    final_sha = hashlib.sha256(audio.read_bytes()).hexdigest()
    doc = wait_for(lambda: sidecar_of(audio).exists() and load_valid(sidecar_of(audio)))
    d.stop()
    assert doc["source"]["sha256"] == final_sha
    store = Store(tmp_path / "state" / "watcher.db")
    try:
        states = [j.state for file_id in (1, 2) for j in store.jobs_of_file(file_id)]
    finally:
        store.close()
    assert states == ["superseded", "done"]


def test_done_and_failed_folders(tmp_path, inbox, emulator, run_daemon):
    """With done_dir and failed_dir set, finished sources (and their sidecars) move out of the inbox."""
    from watcher.config import FolderConfig

    settings = make_settings(tmp_path, inbox, emulator.url)
    folder = FolderConfig(path=inbox, settle_seconds=0.3, done_dir=tmp_path / "done", failed_dir=tmp_path / "failed")
    d = run_daemon(settings.model_copy(update={"folders": (folder,)}))
    write_tone(inbox / "sub" / "ok.wav", 0.2)
    (inbox / "broken.wav").write_text("not audio")
    wait_for(lambda: (tmp_path / "done" / "sub" / "ok.wav").exists(), what="moved to done")
    wait_for(lambda: (tmp_path / "failed" / "broken.wav").exists(), what="moved to failed")
    d.stop()
    assert (tmp_path / "done" / "sub" / "ok.wav.analysis.json").exists()
    assert not (inbox / "sub" / "ok.wav").exists() and not (inbox / "broken.wav").exists()
    load_valid(tmp_path / "done" / "sub" / "ok.wav.analysis.json")


def test_unmounted_folder_is_retried_not_gone(tmp_path):
    """A file whose watched folder vanished (share unmounted) is retried later, never marked gone."""
    import asyncio
    from types import SimpleNamespace

    from watcher.config import ArchiveConfig, SidecarConfig
    from watcher.errors import RetryLater
    from watcher.pipelines.analyze import AnalyzePipeline
    from watcher.pipelines.archive import ArchivePipeline

    share = tmp_path / "share"
    store = Store(tmp_path / "w.db")
    try:
        store.register_revision(
            folder=str(share),
            path=str(share / "a.wav"),
            rel_path="a.wav",
            size=10,
            mtime_ns=1,
            inode=1,
            jobs=[("analyze", "analyze"), ("archive", "check")],
        )
        remote = SimpleNamespace(paid=True, key="analysis http://x account:none")
        aio = AsyncStore(store)
        for pipeline in (
            AnalyzePipeline(aio, remote, models=["key"], sidecar=SidecarConfig()),  # type: ignore[arg-type]
            ArchivePipeline(aio, None, ArchiveConfig(), None, SidecarConfig(), where="processing"),  # type: ignore[arg-type]
        ):
            job = store.claim(pipeline.name, "t")
            with pytest.raises(RetryLater, match="not available"):
                asyncio.run(pipeline.run(job))
    finally:
        store.close()


def test_start_up_objects_are_kept_out_of_the_collector_while_the_daemon_runs(tmp_path, inbox, emulator, run_daemon):
    """Once started, what start-up built is frozen (the collector's passes skip it: the first scan does not pay
    for a full pass over it); when the daemon stops it is handed back, so its cycles can be collected."""
    import gc

    gc.unfreeze()
    d = run_daemon(make_settings(tmp_path, inbox, emulator.url))
    wait_for(lambda: gc.get_freeze_count() > 0, what="start-up objects frozen")
    assert d.stop() == 0
    assert gc.get_freeze_count() == 0
