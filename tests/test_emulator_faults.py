"""The emulator's hostile faults, its paid-request counters and its seeded chaos mode, over real HTTP.

Each test talks to the emulator on 127.0.0.1 with plain httpx, so what it checks is what any client sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY, wait_for, write_tone
from watcher.emulator import Emulator
from watcher.emulator.neuralanalog import HOSTILE_STEM_NAMES

pytestmark = [
    pytest.mark.bill_exempt("the emulator's own faults, driven by raw HTTP: no watcher, no ledger"),
    pytest.mark.usefixtures("gate_stand_in"),
]

STREAM = "/v1/analysis/stream"


@pytest.fixture
def audio(tmp_path: Path) -> bytes:
    return write_tone(tmp_path / "tone.wav", 0.2, freq=330).read_bytes()


@pytest.fixture
def client(emulator: Emulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.url, timeout=10) as c:
        yield c


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def analyze(client: httpx.Client, data: bytes, models: str = "key,bpm_degara:2") -> httpx.Response:
    """One stream request, read to the end (or to the dropped connection)."""
    headers = {"Authorization": f"Bearer {API_KEY}", "filename": "tone.wav"}
    return client.post(STREAM, params={"models": models}, content=data, headers=headers)


def events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]


def upload(client: httpx.Client, data: bytes, name: str = "Song.wav") -> httpx.Response:
    return client.post("/from-file", files={"audio": (name, data, "audio/wav")}, data={"file_source": "from_file"})


def uploaded(client: httpx.Client, data: bytes, name: str = "Song.wav") -> str:
    response = upload(client, data, name)
    assert response.status_code == 200, response.text
    return str(response.json()["audio_id"])


# -- the analysis service ---------------------------------------------------------------------------------


def test_not_sse_answers_plain_json_and_is_paid(emulator: Emulator, client: httpx.Client, audio: bytes) -> None:
    """not_sse: a 200 JSON body instead of an event stream, for N requests; the accepted work counts as paid."""
    emulator.analysis.faults.not_sse = 1
    first = analyze(client, audio)
    assert first.status_code == 200 and first.headers["content-type"] == "application/json"
    assert first.json() == {"result": "ok"}
    second = analyze(client, audio)
    assert second.headers["content-type"] == "text/event-stream"
    assert [e["status"] for e in events(second)] == ["started", "completed", "completed", "finished"]
    assert emulator.paid() == Counter({(sha(audio), "analyze:key"): 2, (sha(audio), "analyze:bpm_degara"): 2})


def test_keepalive_only_sends_comments_then_closes(emulator: Emulator, client: httpx.Client, audio: bytes) -> None:
    """keepalive_only: the stream opens, carries nothing but keep-alive comments for the time set, then ends."""
    emulator.analysis.faults.keepalive_only = 0.6
    emulator.analysis.faults.keepalive_interval = 0.1
    started = time.monotonic()
    response = analyze(client, audio, "key")
    elapsed = time.monotonic() - started
    assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream"
    lines = [line for line in response.text.splitlines() if line]
    assert len(lines) >= 5 and set(lines) == {": keep-alive"}
    assert elapsed >= 0.6
    assert emulator.analysis.faults.keepalive_only == 0.0  # once only
    assert events(analyze(client, audio, "key"))[-1]["status"] == "finished"


# -- the processing service -------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["POST /from-file", "POST /master-audio"])
def test_no_id_answers_ok_without_work(emulator: Emulator, client: httpx.Client, audio: bytes, route: str) -> None:
    """no_id: 200 {"status": "ok"} without the ID field, no object made and nothing paid."""
    emulator.processing.faults.polls_needed = 0
    audio_id = uploaded(client, audio) if route != "POST /from-file" else None
    before = dict(emulator.processing.objects)
    emulator.processing.faults.no_id = {route: 1}
    if route == "POST /from-file":
        response = upload(client, audio)
    else:
        response = client.post("/master-audio", json={"audio_id": audio_id})
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert emulator.processing.objects == before
    paid = emulator.paid()
    assert paid[(sha(audio), "upload")] == (0 if audio_id is None else 1) and paid[(sha(audio), "master")] == 0
    if audio_id is not None:  # the next one does the work
        assert client.post("/master-audio", json={"audio_id": audio_id}).json()["id"]
        assert emulator.paid()[(sha(audio), "master")] == 1


def test_malformed_status_is_200_and_not_json(emulator: Emulator, client: httpx.Client, audio: bytes) -> None:
    """malformed_status: N status answers are 200 with a body that does not parse; then the real one."""
    audio_id = uploaded(client, audio)
    emulator.processing.faults.malformed_status = 2
    for _ in range(2):
        response = client.get(f"/status/audio/{audio_id}")
        assert response.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(response.content)
    assert client.get(f"/status/audio/{audio_id}").json()["object_id"] == audio_id


def test_hostile_stem_names_in_status_details(emulator: Emulator, client: httpx.Client, audio: bytes) -> None:
    """hostile_stem_names: the split's status lists stems named as path attacks (and one empty)."""
    emulator.processing.faults.polls_needed = 0
    emulator.processing.faults.hostile_stem_names = True
    audio_id = uploaded(client, audio)
    creation = client.post("/create-stems", json={"audio_id": audio_id, "preset": "6_tracks"}).json()["creation_id"]
    status = client.get(f"/status/stem_split/{creation}").json()
    names = [s["name"] for s in status["status_details"]["stems"]]
    assert len(names) == 6 and set(names) == set(HOSTILE_STEM_NAMES)
    assert {"../../escape", "/abs/evil", "a/b", "..", ""} <= set(names)


def test_redirect_to_points_downloads_elsewhere(emulator: Emulator, client: httpx.Client, audio: bytes) -> None:
    """redirect_to: every object download answers 307 to the given Location (here a local file URL)."""
    emulator.processing.faults.polls_needed = 0
    audio_id = uploaded(client, audio)
    emulator.processing.faults.redirect_to = "file:///etc/passwd"
    for _ in range(2):
        response = client.get(f"/download/audio/{audio_id}", follow_redirects=False)
        assert response.status_code == 307 and response.headers["location"] == "file:///etc/passwd"
    emulator.processing.faults.redirect_to = None
    signed = client.get(f"/download/audio/{audio_id}", follow_redirects=False).headers["location"]
    assert signed.startswith(emulator.storage.url)


def test_not_ready_archive_answers_409(emulator: Emulator, client: httpx.Client, audio: bytes) -> None:
    """not_ready_archive: N archive requests are answered 409 "archive not ready yet", then one is offered."""
    emulator.processing.faults.polls_needed = 0
    audio_id = uploaded(client, audio)
    emulator.processing.faults.not_ready_archive = 1
    request = {"id": audio_id, "versions": ["original"]}
    refused = client.post("/download-archive", json=request)
    assert refused.status_code == 409 and refused.json() == {"detail": "archive not ready yet"}
    offered = client.post("/download-archive", json=request)
    assert offered.status_code == 200 and offered.json()["download_url"].startswith(emulator.storage.url)


def test_reject_uploads_by_file_name(emulator: Emulator, client: httpx.Client, audio: bytes) -> None:
    """reject_uploads: a file whose name contains a listed word gets 422 naming it; nothing is kept or paid."""
    emulator.processing.faults.reject_uploads = {"forbidden"}
    refused = upload(client, audio, "My forbidden take.wav")
    assert refused.status_code == 422
    assert "My forbidden take.wav" in refused.json()["detail"] and "refused" in refused.json()["detail"]
    assert emulator.processing.objects == {} and emulator.paid() == Counter()
    uploaded(client, audio, "Allowed.wav")
    assert emulator.paid() == Counter({(sha(audio), "upload"): 1})


def test_complete_after_finishes_jobs_nobody_polls(emulator: Emulator, client: httpx.Client, audio: bytes) -> None:
    """complete_after: a job nobody polls completes on its own, so the archive of its audio can take it."""
    faults = emulator.processing.faults
    faults.polls_needed, faults.complete_after = 50, 0.3
    audio_id = uploaded(client, audio)
    client.post("/master-audio", json={"audio_id": audio_id}).raise_for_status()
    request = {"id": audio_id, "versions": ["original", "mastered"]}
    first = client.post("/download-archive", json=request)
    assert first.status_code == 422 and "not complete" in first.json()["detail"]
    wait_for(lambda: client.post("/download-archive", json=request).status_code == 200, timeout=5, what="archive")


# -- what could be billed ---------------------------------------------------------------------------------


def test_paid_counts_accepted_work_per_content(
    emulator: Emulator, client: httpx.Client, audio: bytes, tmp_path: Path
) -> None:
    """Refusals before work are free; lost answers after the work are paid; jobs count against the upload's bytes."""
    other = write_tone(tmp_path / "other.wav", 0.2, freq=880).read_bytes()
    faults = emulator.processing.faults
    faults.polls_needed = 0
    faults.status_429 = {"POST /from-file": 1}
    faults.status_500 = {"POST /master-audio": 1}
    faults.lose_answer = {"POST /upscale-audio": 1}
    assert upload(client, audio).status_code == 429
    audio_id = uploaded(client, audio)
    uploaded(client, other, "Other.wav")
    assert client.post("/master-audio", json={"audio_id": audio_id}).status_code == 500
    mastered = client.post("/master-audio", json={"audio_id": audio_id}).json()["id"]
    with pytest.raises(httpx.TransportError):
        client.post("/upscale-audio", json={"audio_id": audio_id})
    client.post("/create-stems", json={"mastered_id": mastered, "preset": "2_tracks"}).raise_for_status()
    emulator.analysis.faults.status_429 = 1
    assert analyze(client, other, "key:1,loudness-ebur128").status_code == 429
    assert analyze(client, other, "key:1,loudness-ebur128").status_code == 200
    assert emulator.paid() == Counter(
        {
            (sha(audio), "upload"): 1,
            (sha(other), "upload"): 1,
            (sha(audio), "master"): 1,
            (sha(audio), "restore"): 1,  # its answer was lost, the work was done
            (sha(audio), "stems"): 1,  # split of the master, billed to the original content
            (sha(other), "analyze:key"): 1,
            (sha(other), "analyze:loudness-ebur128"): 1,
        }
    )


# -- chaos -------------------------------------------------------------------------------------------------


def chaos_run(emulator: Emulator, client: httpx.Client, audio: bytes, seed: int) -> list[tuple[str, str]]:
    """Twenty uploads and twenty streams under chaos at rate 1: every request meets a fault."""
    emulator.chaos(seed, 1.0)
    for _ in range(20):
        with contextlib.suppress(httpx.TransportError):  # a lost answer or a dropped stream
            upload(client, audio)
        with contextlib.suppress(httpx.TransportError):
            analyze(client, audio, "key")
    emulator.chaos(seed, 0.0)
    return emulator.injected


def test_chaos_is_seeded_and_paid_counts_follow_it(emulator: Emulator, client: httpx.Client, audio: bytes) -> None:
    """Every request meets a drawn fault; the same seed draws the same faults; only work done is paid."""
    injected = chaos_run(emulator, client, audio, seed=1234)
    assert len(injected) == 40
    faults = Counter(fault for _, fault in injected)
    assert set(faults) <= {"429", "500", "503", "lose_answer", "drop_stream"} and len(faults) >= 4
    uploads = Counter(f for r, f in injected if r == "POST /from-file")
    streams = Counter(f for r, f in injected if r == f"POST {STREAM}")
    assert set(uploads) <= {"429", "500", "503", "lose_answer"}
    assert set(streams) <= {"429", "500", "503", "drop_stream"}
    paid = emulator.paid()
    assert paid[(sha(audio), "upload")] == uploads["lose_answer"]
    assert paid[(sha(audio), "analyze:key")] == streams["drop_stream"]
    assert len(emulator.processing.objects) == uploads["lose_answer"]
    # Calm again: a request goes through untouched, and nothing more is injected.
    assert analyze(client, audio, "key").status_code == 200 and len(emulator.injected) == 40
    emulator.reset()
    assert emulator.paid() == Counter() and emulator.injected == []
    assert chaos_run(emulator, client, audio, seed=1234) == injected


def test_chaos_storage_and_retry_after(emulator: Emulator, client: httpx.Client, audio: bytes) -> None:
    """The storage host meets 500 or 503; an injected 429 carries a short Retry-After."""
    emulator.processing.faults.polls_needed = 0
    audio_id = uploaded(client, audio)
    signed = client.get(f"/download/audio/{audio_id}", follow_redirects=False).headers["location"]
    emulator.chaos(7, 1.0)
    statuses = {httpx.get(signed, timeout=10).status_code for _ in range(10)}
    assert statuses <= {500, 503} and statuses
    retry_after = set()
    for _ in range(30):
        response = client.get(f"/status/audio/{audio_id}")
        if response.status_code == 429:
            retry_after.add(response.headers["retry-after"])
    assert retry_after == {"0.1"}
    emulator.chaos(7, 0.0)
    assert httpx.get(signed, timeout=10).content == audio


def test_a_request_is_stamped_when_it_arrives_before_its_body(emulator: Emulator, client: httpx.Client) -> None:
    """``arrived`` is taken when the headers reach the server: between the client's start and its last chunk."""
    seen: list[float] = []
    started = time.monotonic()

    def body() -> Iterator[bytes]:
        yield b"RIFF"
        recorded = wait_for(lambda: emulator.api.requests, what="the request recorded before its body ends")
        seen.append(time.monotonic())
        assert len(recorded) == 1
        yield b"\0" * 64

    response = client.post(STREAM, params={"models": "tempo"}, content=body(), headers={"Authorization": "Bearer x"})
    assert response.status_code == 401  # the emulator's key is another one: answered after the body is drained
    (request,) = emulator.api.requests
    assert request.route == "POST /v1/analysis/stream"
    assert started <= request.arrived <= seen[0]
