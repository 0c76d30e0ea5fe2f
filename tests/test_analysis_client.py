"""The analysis client against the emulator on 127.0.0.1: the contract, and every fault the emulator injects."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, write_tone
from watcher.audiofile import FileBody, signature
from watcher.errors import NeedsUser, NotSent, Rejected, RetryLater
from watcher.services.analysis import AnalysisClient, ModelResult, match_requested
from watcher.services.http import HttpPolicy

pytestmark = [
    pytest.mark.bill_exempt("the analysis client alone, with no store: no ledger to hold the bill against"),
    pytest.mark.usefixtures("gate_stand_in"),
]

MODELS = ["key:1", "bpm_degara", "loudness-ebur128"]
FAST = HttpPolicy(wait_initial=0.05, wait_max=0.2, wait_jitter=0.05, attempts=4, read_timeout=5)


def analyse(url: str, audio: Path, models=MODELS, *, key: str | None = API_KEY, policy: HttpPolicy = FAST):
    """Run one analysis; returns the report and the results in the order the callback saw them."""
    seen: list[ModelResult] = []

    async def go():
        client = AnalysisClient(url, key, policy=policy)
        try:
            return await client.analyze(FileBody(audio, signature(audio)), models, seen.append)
        finally:
            await client.aclose()

    return asyncio.run(go()), seen


@pytest.fixture
def audio(tmp_path: Path) -> Path:
    return write_tone(tmp_path / "Ünïcode take ♪.wav", 0.5)


def test_clean_stream_follows_the_contract(emulator, audio):
    """One request: raw body, Bearer key, filename header, models in the query; results keyed by returned name."""
    report, seen = analyse(emulator.url, audio)
    assert set(report.results) == set(MODELS)
    assert report.results["loudness-ebur128"].model_name == "loudness_ebur128"
    assert report.results["key:1"].model_version == "1"
    assert all(r.correlation_id for r in report.results.values())
    assert "key" in report.results["key:1"].results and "bpm" in report.results["bpm_degara"].results
    assert len(seen) == 3 and report.errors == []
    (request,) = emulator.api.requests
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.headers["Accept"] == "text/event-stream"
    assert request.headers["Content-Length"] == str(audio.stat().st_size)
    assert request.headers["filename"].endswith(".wav")
    assert request.query["models"] == [",".join(MODELS)]
    assert emulator.analysis.bytes_received == audio.stat().st_size


def test_429_is_not_sent_and_not_retried_here(emulator, audio):
    """A 429 provably did nothing: NotSent with its Retry-After, one request; the retry is the gate's next take."""
    emulator.analysis.faults.status_429 = 1
    emulator.analysis.faults.retry_after = 0.5
    with pytest.raises(NotSent) as err:
        analyse(emulator.url, audio)
    assert err.value.retry_after == 0.5
    assert emulator.api.counts()["POST /v1/analysis/stream"] == 1


def test_long_retry_after_goes_back_to_the_store(emulator, audio):
    """A Retry-After longer than the in-process limit is raised with its delay for the store to schedule."""
    emulator.analysis.faults.status_429 = 1
    emulator.analysis.faults.retry_after = 120
    with pytest.raises(RetryLater) as err:
        analyse(emulator.url, audio)
    assert err.value.retry_after == 120
    assert emulator.api.counts()["POST /v1/analysis/stream"] == 1


def test_a_500_goes_back_to_the_caller_after_one_request(emulator, audio):
    """A 500 is RetryLater naming the status, after exactly one request: no retry loop below the gate."""
    emulator.analysis.faults.status_500 = 100
    with pytest.raises(RetryLater, match="HTTP 500"):
        analyse(emulator.url, audio)
    assert emulator.api.counts()["POST /v1/analysis/stream"] == 1


def test_a_dropped_connection_hands_over_what_came_and_is_not_resent(emulator, audio):
    """A stream cut after one result: that result is handed over, RetryLater says the stream broke, and no second
    request is sent (asking for the two still missing is a new take at the gate)."""
    emulator.analysis.faults.drop_after = 1
    seen: list[ModelResult] = []

    async def go() -> Any:
        client = AnalysisClient(emulator.url, API_KEY, policy=FAST)
        try:
            return await client.analyze(FileBody(audio, signature(audio)), MODELS, seen.append)
        finally:
            await client.aclose()

    with pytest.raises(RetryLater, match="could not be reached"):
        asyncio.run(go())
    assert len(seen) == 1
    assert emulator.analysis.models_requested == [MODELS]


def test_eof_without_finished_is_retried_for_the_rest(emulator, audio):
    """EOF before `finished` after all results: nothing is missing, so no second request is made."""
    emulator.analysis.faults.eof_without_finished = 1
    report, _ = analyse(emulator.url, audio)
    assert set(report.results) == set(MODELS)
    assert len(emulator.analysis.models_requested) == 1


def test_eof_without_finished_with_a_missing_model(emulator, audio):
    """A model lost to an error event and an early EOF: RetryLater naming it, after one request."""
    emulator.analysis.faults.error_models = {"bpm_degara"}
    emulator.analysis.faults.eof_without_finished = 1
    with pytest.raises(RetryLater, match="bpm_degara"):
        analyse(emulator.url, audio)
    assert emulator.analysis.models_requested == [MODELS]


def test_error_event_after_finished_is_reported(emulator, audio):
    """An error event names no model: the report carries the message and the model stays missing."""
    emulator.analysis.faults.error_models = {"key"}
    report, _ = analyse(emulator.url, audio)
    assert "key:1" not in report.results
    assert report.errors == ["model key failed to process the audio"]
    assert len(emulator.analysis.models_requested) == 1


def test_slow_answers_arrive(emulator, audio):
    """Events spaced out in time still all arrive within the read timeout."""
    emulator.analysis.faults.event_delay = 0.2
    report, _ = analyse(emulator.url, audio)
    assert set(report.results) == set(MODELS)


def test_slow_answers_beyond_the_timeout_are_retried(emulator, audio):
    """A stream silent for longer than the read timeout is a transient failure."""
    emulator.analysis.faults.event_delay = 1.0
    policy = HttpPolicy(read_timeout=0.3, attempts=1)
    with pytest.raises(RetryLater, match=r"timed out|no event"):
        analyse(emulator.url, audio, policy=policy)


def test_bad_key_needs_the_user(emulator, audio):
    """A refused key is not retried: one request, and a message that says to check the key."""
    with pytest.raises(NeedsUser, match="API key was refused") as err:
        analyse(emulator.url, audio, key="wrong-key-000")
    assert "wrong-key-000" not in str(err.value)
    assert emulator.api.counts()["POST /v1/analysis/stream"] == 1


def test_unknown_model_is_reported_not_retried(emulator, audio):
    """A 422 for a model name the service does not know is reported with its detail, once."""
    emulator.analysis.faults.reject_models = {"genre_nonexistent"}
    with pytest.raises(Rejected, match="unknown model: genre_nonexistent"):
        analyse(emulator.url, audio, ["key", "genre_nonexistent"])
    assert emulator.api.counts()["POST /v1/analysis/stream"] == 1


def test_unreachable_service_is_retry_later(audio):
    """Nothing listening: a transient error after the attempts, naming the cause."""
    with pytest.raises(RetryLater, match="could not be reached"):
        analyse("http://127.0.0.1:9", audio, policy=HttpPolicy(attempts=2, wait_initial=0.01, wait_jitter=0))


def test_body_is_the_exact_file(emulator, audio, tmp_path):
    """The emulator receives the file's exact bytes (sha256), streamed."""
    captured = {}
    original = emulator.analysis._receive

    def receive(req):
        digest, path = original(req)
        captured["sha"] = digest.hex()
        return digest, path

    emulator.analysis._receive = receive
    analyse(emulator.url, audio)
    assert captured["sha"] == hashlib.sha256(audio.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("returned", "version", "requested", "expected"),
    [
        ("loudness_ebur128", "1", ["loudness-ebur128"], "loudness-ebur128"),
        ("loudness-ebur128", "1", ["loudness_ebur128"], "loudness_ebur128"),
        ("Loudness_EBUR128", None, ["loudness-ebur128"], "loudness-ebur128"),
        ("genre_discogs400", "1", ["genre_discogs_400"], "genre_discogs_400"),
        ("genre_discogs_400", "1", ["genre_discogs400"], "genre_discogs400"),
        ("key", "1", ["key:1", "bpm_degara"], "key:1"),
        ("key", "2", ["key:1", "bpm_degara"], None),
        ("key", None, ["key:1"], "key:1"),
        ("bpm_degara", "1", ["key:1", "bpm_degara"], "bpm_degara"),
        ("mood_happy", "1", ["mood_sad", "key"], None),
        ("mood_sad", "1", ["mood_happy"], None),
        ("genre_mtgjamendo-2", "1", ["genre_mtgjamendo-1"], None),
        ("voice_instrumental", "1", ["voice_instrumental", "voice-instrumental"], None),
    ],
)
def test_returned_names_match_requested_specs_by_one_rule(returned, version, requested, expected):
    """Names match when equal lower-cased with - and _ removed, and a version asked for must be the one returned;
    nothing matches by likeness, and an answer two asked models could claim matches neither."""
    assert match_requested(returned, version, requested) == expected


def test_a_stream_of_keep_alives_only_is_broken_off(emulator, audio):
    """Keep-alive comments keep a socket busy but are not events: past the deadline the stream is broken off
    (RetryLater, one request: asking again is the gate's next take; the read timeout alone would wait forever)."""
    emulator.analysis.faults.keepalive_only = 5.0
    emulator.analysis.faults.keepalive_interval = 0.05

    async def go() -> Any:
        client = AnalysisClient(emulator.url, API_KEY, policy=FAST, event_deadline=0.5)
        try:
            return await client.analyze(FileBody(audio, signature(audio)), MODELS, lambda r: None)
        finally:
            await client.aclose()

    with pytest.raises(RetryLater, match="no event"):
        asyncio.run(go())
    assert emulator.api.counts()["POST /v1/analysis/stream"] == 1
