"""Whom an error stops: one file, one service, or nobody (transient). The daemon against a hostile emulator.

A refusal about one file fails that file after a few attempts with the service's own message, and never
pauses anything else; an account refusal pauses that service only; answers without their ID or without an
event stream are faults of the service for that file, never an endless "needs the user".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import API_KEY, make_settings, wait_for, write_tone
from tests.test_archive import PKEY, archive_settings, wait_delivery
from tests.test_paid_once import status
from watcher.config import RetryConfig
from watcher.emulator import Emulator

pytestmark = pytest.mark.timeout(90)
FAST = RetryConfig(backoff_initial=0.1, backoff_max=0.3, max_attempts=6, needs_user_backoff=60)


@pytest.fixture
def emu():
    with Emulator(analysis_key=API_KEY, processing_key=PKEY, use_local=False) as e:
        e.processing.faults.polls_needed = 0
        yield e


def problem(tmp_path: Path, name: str, pipeline: str, state: str = "failed") -> dict | None:
    """The status's problem row for one file and pipeline, once it is in ``state`` (failed, in_doubt)."""
    for p in status(tmp_path)["problems"]:
        if p["path"].endswith(name) and p["pipeline"] == pipeline and p["state"] == state:
            return p
    return None


def test_a_422_on_one_upload_fails_that_file_only(tmp_path, inbox, emu, run_daemon):
    """The service refuses one upload: that file fails after 3 attempts with its message; the others go on."""
    emu.processing.faults.reject_uploads = {"refused"}
    settings = archive_settings(tmp_path, inbox, emu, versions=("original",)).model_copy(update={"retry": FAST})
    d = run_daemon(settings)
    write_tone(inbox / "refused take.wav", 0.3, freq=300)
    for n in range(3):
        write_tone(inbox / f"good{n}.wav", 0.3, freq=400 + n * 50)
    for n in range(3):
        wait_delivery(tmp_path, f"good{n}")
    failed = wait_for(lambda: problem(tmp_path, "refused take.wav", "archive"), what="the refused file failing")
    write_tone(inbox / "later.wav", 0.3, freq=900)  # the service was never paused
    wait_delivery(tmp_path, "later")
    d.stop()
    assert failed["error_code"] == "rejected" and failed["attempts"] == 3
    assert "HTTP 422" in failed["error"] and "refused" in failed["error"]
    uploads = [r for r in emu.api.requests if r.route == "POST /from-file"]
    assert len(uploads) == 3 + 3 + 1  # three tries of the refused file, one of each good file
    assert not [p for p in status(tmp_path)["problems"] if "paused" in (p["error"] or "")]


def test_an_answer_without_its_id_is_held_in_doubt(tmp_path, inbox, emu, run_daemon):
    """200 without the ID field on mastering: the whole request was sent, so the work may be done: the file is
    held in doubt after one request, never re-sent on its own, and the service is not paused."""
    emu.processing.faults.no_id = {"POST /master-audio": 100}
    settings = archive_settings(tmp_path, inbox, emu, versions=("original", "mastered"))
    d = run_daemon(settings.model_copy(update={"retry": FAST}))
    write_tone(inbox / "x.wav", 0.3)
    held = wait_for(lambda: problem(tmp_path, "x.wav", "archive", "in_doubt"), what="the archive held")
    d.stop()
    assert held["error_code"] == "in_doubt" and "without 'id'" in held["error"]
    assert held["step"] == "process"
    assert emu.api.counts()["POST /master-audio"] == 1


def test_a_body_that_is_not_an_event_stream_is_a_fault_for_that_file(tmp_path, inbox, emu, run_daemon):
    """The analysis service answers JSON instead of a stream: re-asked a few times, then a sidecar says why."""
    emu.analysis.faults.not_sse = 100
    d = run_daemon(make_settings(tmp_path, inbox, emu.url).model_copy(update={"retry": FAST}))
    write_tone(inbox / "y.wav", 0.3)
    failed = wait_for(lambda: problem(tmp_path, "y.wav", "analyze"), what="the analysis failing")
    d.stop()
    assert failed["error_code"] == "malformed" and "without an event stream" in failed["error"]
    doc = json.loads((inbox / "y.wav.analysis.json").read_text())
    assert doc["complete"] is False and "without an event stream" in doc["errors"][-1]["message"]
    assert emu.api.counts()["POST /v1/analysis/stream"] == 3


def test_a_refused_key_pauses_that_service_only(tmp_path, inbox, emu, run_daemon):
    """401 from the analysis service pauses analysis; the archive, on the other service, delivers meanwhile."""
    emu.analysis.faults.status_401 = 100
    settings = archive_settings(tmp_path, inbox, emu, versions=("original",))
    d = run_daemon(settings)
    write_tone(inbox / "a.wav", 0.3, freq=300)
    write_tone(inbox / "b.wav", 0.3, freq=600)
    wait_delivery(tmp_path, "a")
    wait_delivery(tmp_path, "b")
    report = status(tmp_path)
    d.stop()
    analysis = [p for p in report["problems"] if p["pipeline"] == "analyze"]
    assert analysis and all(p["state"] == "pending" and p["error_code"] == "needs_user" for p in analysis)
    assert all("API key was refused" in p["error"] for p in analysis)
    # Paused after the first refusals (one per worker already under way): the service is not hammered.
    assert emu.api.counts()["POST /v1/analysis/stream"] <= settings.analysis.concurrency
