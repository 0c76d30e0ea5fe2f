"""Never pay twice: the daemon end to end against the emulator, counting paid requests where they arrive.

Copies of one content at once, a lost answer held in doubt and re-sent on the user's word, a daily cap reached
mid-batch, a file overwritten while its stream is held, and a switch of endpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import API_KEY, make_settings, wait_for, write_tone
from tests.test_archive import PKEY, archive_settings, wait_delivery
from watcher.config import AnalysisConfig, FolderConfig
from watcher.emulator import Emulator

pytestmark = pytest.mark.timeout(90)
STREAM = "POST /v1/analysis/stream"


@pytest.fixture
def emu():
    with Emulator(analysis_key=API_KEY, processing_key=PKEY, use_local=False) as e:
        e.processing.faults.polls_needed = 1
        yield e


def models_asked(emu: Emulator) -> Counter[str]:
    """How often each model was asked for, over every stream the emulator accepted."""
    return Counter(m for request in emu.analysis.models_requested for m in request)


def cli(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """`watcher ARGS` against the test's state folder, as a user runs it beside the daemon (``settings``: env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env["WATCHER_STATE_DIR"] = str(tmp_path / "state")
    env.update({f"WATCHER_{k.upper()}": v for k, v in settings.items()})
    return subprocess.run(
        [sys.executable, "-m", "watcher", *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def status(tmp_path: Path, **settings: str) -> dict:
    done = cli(tmp_path, "status", "--json", **settings)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def sidecar_doc(audio: Path) -> dict:
    """The sidecar of ``audio`` as it is now ({} while there is none, or while it is being replaced)."""
    try:
        return dict(json.loads(audio.with_name(audio.name + ".analysis.json").read_text()))
    except (OSError, ValueError):
        return {}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_identical_copies_at_once_are_paid_once(tmp_path, inbox, emu, run_daemon):
    """Three byte-identical copies dropped together: one request per model and per processing operation.

    Before the gate this counted 3 streams, 3 uploads and 3 mastering requests for one content.
    """
    settings = archive_settings(tmp_path, inbox, emu, versions=("original", "mastered"))
    emu.analysis.faults.event_delay = 0.2  # a stream long enough for the copies to meet
    write_tone(tmp_path / "src.wav", 0.5, freq=330)
    for name in ("a", "b", "c"):
        shutil.copy(tmp_path / "src.wav", tmp_path / f"{name}.wav")
    d = run_daemon(settings)
    for name in ("a", "b", "c"):
        os.rename(tmp_path / f"{name}.wav", inbox / f"{name}.wav")
    for name in ("a", "b", "c"):
        wait_delivery(tmp_path, name)
        wait_for(lambda n=name: "complete" in sidecar_doc(inbox / f"{n}.wav"), what=f"the analysis in {name}'s sidecar")
    d.stop()
    assert models_asked(emu) == {"key": 1, "bpm_degara": 1, "loudness-ebur128": 1}
    counts = emu.api.counts()
    assert (counts["POST /from-file"], counts["POST /master-audio"]) == (1, 1)
    for name in ("a", "b", "c"):
        doc = json.loads((inbox / f"{name}.wav.analysis.json").read_text())
        assert doc["complete"] and doc["source"]["sha256"] == sha(tmp_path / "src.wav")
        manifest = json.loads((tmp_path / "out" / name / "manifest.json").read_text())
        assert manifest["source"]["sha256"] == doc["source"]["sha256"]
        assert sorted(manifest["versions"]) == ["mastered", "original"]


def test_lost_answer_is_held_counted_once_and_resent_by_retry(tmp_path, inbox, emu, run_daemon):
    """The mastering answer is lost after the work: held in doubt (not re-sent), shown, re-sent by `retry`."""
    emu.processing.faults.lose_answer = {"POST /master-audio": 1}
    settings = archive_settings(tmp_path, inbox, emu, versions=("original", "mastered"))
    d = run_daemon(settings)
    write_tone(inbox / "song.wav", 0.4)
    report = wait_for(lambda: (s := status(tmp_path))["in_doubt"] and s, what="the mastering request in doubt")
    (held,) = report["in_doubt"]
    assert held["path"].endswith("song.wav") and held["operation"] == "master" and held["since"]
    (entry,) = [f for f in report["files"] if f["path"].endswith("song.wav")]
    assert entry["jobs"]["archive"]["state"] == "in_doubt"
    human = cli(tmp_path, "status").stdout
    assert "in doubt" in human and "song.wav" in human and "master" in human
    assert emu.api.counts()["POST /master-audio"] == 1  # held, not re-sent on its own
    retried = cli(tmp_path, "retry", "--in-doubt")
    assert retried.returncode == 0 and "1 job(s)" in retried.stdout
    manifest = wait_delivery(tmp_path, "song")
    d.stop()
    assert sorted(manifest["versions"]) == ["mastered", "original"]
    assert emu.api.counts()["POST /master-audio"] == 2  # the one re-send the user asked for
    assert emu.api.counts()["POST /from-file"] == 1
    assert status(tmp_path)["in_doubt"] == []


def test_daily_cap_reached_mid_batch(tmp_path, inbox, emu, run_daemon):
    """A cap of 2.5 s of audio a day: two 1-second files are analysed, the third waits with a reason naming the cap."""
    analysis = AnalysisConfig(base_url=emu.url, api_key=API_KEY, daily_audio_minutes=2.5 / 60)
    settings = make_settings(tmp_path, inbox, emu.url).model_copy(update={"analysis": analysis})
    d = run_daemon(settings)
    for n, freq in enumerate((220, 330, 440)):
        write_tone(inbox / f"t{n}.wav", 1.0, freq=freq)
    wait_for(lambda: len(list(inbox.glob("*.analysis.json"))) == 2, what="two sidecars")
    cap = {"analysis__daily_audio_minutes": str(2.5 / 60)}
    report = wait_for(
        lambda: (s := status(tmp_path, **cap)) and any("cap" in (p["error"] or "") for p in s["problems"]) and s,
        what="the third file waiting for the cap",
    )
    d.stop()
    (waiting,) = [p for p in report["problems"] if "cap" in (p["error"] or "")]
    assert "daily cap" in waiting["error"] and "00:00 UTC" in waiting["error"]
    assert waiting["next_attempt_at"] is not None
    assert len(emu.analysis.models_requested) == 2
    spend = report["spend"]["analysis"]
    assert spend["seconds_today"] == pytest.approx(2.0) and spend["paid_calls_today"] == 2
    assert spend["minutes_today"] <= spend["cap_minutes"] and spend["capped_at"]
    assert "of 0.0416667 (daily cap)" in cli(tmp_path, "status", **cap).stdout


def test_overwrite_during_a_held_stream_moves_matching_pairs(tmp_path, inbox, emu, run_daemon):
    """A file overwritten while its stream is held: the late result writes nothing; what moves matches itself."""
    done_dir = tmp_path / "done"
    settings = make_settings(tmp_path, inbox, emu.url)
    folder = FolderConfig(path=inbox, settle_seconds=0.3, done_dir=done_dir)
    settings = settings.model_copy(update={"folders": (folder,)})
    emu.analysis.faults.event_delay = 0.6  # about 2.4 s per stream
    d = run_daemon(settings)
    write_tone(tmp_path / "v1.wav", 0.5, freq=200)
    os.rename(tmp_path / "v1.wav", inbox / "take.wav")
    wait_for(lambda: len(emu.analysis.models_requested) == 1, what="the first stream")
    write_tone(tmp_path / "v2.wav", 0.7, freq=900)
    os.replace(tmp_path / "v2.wav", inbox / "take.wav")
    moved = done_dir / "take.wav"
    wait_for(lambda: (done_dir / "take.wav.analysis.json").exists(), timeout=30, what="the move to done_dir")
    emu.analysis.faults.event_delay = 0
    d.stop()
    doc = json.loads((done_dir / "take.wav.analysis.json").read_text())
    assert doc["source"]["sha256"] == sha(moved)
    assert doc["source"]["size"] == moved.stat().st_size
    for side in inbox.rglob("*.analysis.json"):  # nothing stale left behind
        audio = side.with_name(side.name.removesuffix(".analysis.json"))
        assert audio.exists() and json.loads(side.read_text())["source"]["sha256"] == sha(audio)


def test_endpoint_switch_asks_the_new_endpoint(tmp_path, inbox, emu, run_daemon):
    """Results paid at one endpoint are never reused for another: the new endpoint is asked, and says so."""
    write_tone(inbox / "a.wav", 0.3)
    d = run_daemon(make_settings(tmp_path, inbox, emu.url))
    wait_for((inbox / "a.wav.analysis.json").exists)
    d.stop()
    with Emulator(analysis_key=API_KEY, use_local=False) as other:
        shutil.copy(inbox / "a.wav", inbox / "b.wav")  # the same content, seen after the switch
        d = run_daemon(make_settings(tmp_path, inbox, other.url))
        wait_for((inbox / "b.wav.analysis.json").exists)
        d.stop()
        assert other.api.counts()[STREAM] == 1
        doc = json.loads((inbox / "b.wav.analysis.json").read_text())
        assert doc["backend"]["base_url"] == other.url
    assert emu.api.counts()[STREAM] == 1


def test_a_dry_run_sends_nothing_and_writes_nothing(tmp_path, inbox, emu):
    """`watcher scan --dry-run` over a folder: 0 requests, 0 files written (not even the state folder), and a
    per-file and per-service account of what a real scan would ask and cost."""
    for n, seconds in enumerate((1.0, 2.0)):
        write_tone(inbox / f"t{n}.wav", seconds, freq=300 + n * 100)
    (inbox / "notes.wav").write_text("not audio")
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    done = cli(
        tmp_path,
        "scan",
        "--dry-run",
        str(inbox),
        analysis__base_url=emu.url,
        archive__enabled="true",
        archive__base_url=emu.url,
        archive__output_dir=str(tmp_path / "out"),
    )
    assert done.returncode == 0, done.stderr
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "state").exists() and emu.api.requests == []
    out = done.stdout
    assert "t0.wav  (1.0 s)" in out and "t1.wav  (2.0 s)" in out
    assert "would ask key, bpm_degara, loudness-ebur128" in out and "paid calls: upload, master" in out
    assert "notes.wav: a scan would refuse it" in out and "not audio" in out
    assert "analysis (Essentia API): 2 paid calls" in out
    assert "processing (Neural Analog): 4 paid calls" in out and "(upload 2, master 2)" in out
