"""Metrics and webhooks: what a monitoring system scrapes, and what a receiver is sent."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import httpx
import pytest

from tests.conftest import Receiver, make_settings, wait_for, write_tone
from watcher.config import MetricsConfig, WebhooksConfig

pytestmark = pytest.mark.timeout(60)


def test_metrics_endpoint(tmp_path, inbox, emulator, run_daemon):
    """/metrics shows files seen and done, queue depth, service latency and bytes uploaded."""
    settings = make_settings(tmp_path, inbox, emulator.url).model_copy(
        update={"metrics": MetricsConfig(enabled=True, port=0)}
    )
    d = run_daemon(settings, heartbeat=0.1)
    audio = write_tone(inbox / "m.wav", 0.3)
    wait_for(lambda: (inbox / "m.wav.analysis.json").exists())
    wait_for(lambda: d.daemon.metrics_address is not None)
    host, port = d.daemon.metrics_address
    text = wait_for(
        lambda: (
            (t := httpx.get(f"http://{host}:{port}/metrics").text)
            and 'watcher_files_done_total{pipeline="analyze"} 1.0' in t
            and 'watcher_queue_depth{pipeline="analyze"} 0.0' in t
            and t
        )
    )
    d.stop()
    assert f'watcher_files_seen_total{{folder="{inbox}"}} 1.0' in text
    assert 'watcher_service_request_seconds_count{service="analysis service"} 1.0' in text
    assert f'watcher_bytes_uploaded_total{{service="analysis service"}} {float(audio.stat().st_size)}' in text
    assert 'watcher_queue_depth{pipeline="analyze"} 0.0' in text  # the value, not only the HELP line


def test_webhooks_for_done_and_failed(tmp_path, inbox, emulator, run_daemon):
    """A done and a failed file each reach the receiver, signed, even though it failed twice first."""
    receiver = Receiver(script=(500, 500))
    try:
        hooks = WebhooksConfig(urls=(receiver.url,), secret="hook-secret-123")
        settings = make_settings(tmp_path, inbox, emulator.url).model_copy(update={"webhooks": hooks})
        d = run_daemon(settings)
        write_tone(inbox / "good.wav", 0.3)
        (inbox / "bad.wav").write_text("no audio here")
        wait_for(lambda: len(receiver.bodies()) == 4, timeout=30, what="two webhooks, the first after two 500s")
        d.stop()
    finally:
        receiver.server.stop()
    events = {Path(b["path"]).name: b for b in receiver.bodies()}
    assert events["good.wav"]["event"] == "file.done" and events["good.wav"]["pipeline"] == "analyze"
    assert events["good.wav"]["sidecar"].endswith("good.wav.analysis.json")
    assert events["bad.wav"]["event"] == "file.failed" and "not audio" in events["bad.wav"]["error"]
    for raw, headers in receiver.received:  # the signature covers the exact bytes that were sent
        expected = hmac.new(b"hook-secret-123", raw, hashlib.sha256).hexdigest()
        assert headers["X-Watcher-Signature"] == f"sha256={expected}"
        assert b"hook-secret-123" not in raw


def test_dead_webhook_url_does_not_hurt(tmp_path, inbox, emulator, run_daemon):
    """A receiver that is not there costs a log line, never the file's processing."""
    hooks = WebhooksConfig(urls=("http://127.0.0.1:9/hook",))
    settings = make_settings(tmp_path, inbox, emulator.url).model_copy(update={"webhooks": hooks})
    d = run_daemon(settings)
    write_tone(inbox / "x.wav", 0.2)
    wait_for(lambda: (inbox / "x.wav.analysis.json").exists())
    assert d.stop() == 0


def test_in_doubt_and_cap_reach_webhooks_and_metrics(tmp_path, inbox, run_daemon):
    """A held request sends `file.in_doubt`; a reached cap sends `spend.capped` once; /metrics counts paid calls."""
    from tests.conftest import API_KEY
    from tests.test_archive import PKEY, archive_settings
    from watcher.emulator import Emulator

    receiver = Receiver()
    with Emulator(analysis_key=API_KEY, processing_key=PKEY, use_local=False) as emu:
        try:
            emu.processing.faults.polls_needed = 0
            emu.processing.faults.lose_answer = {"POST /master-audio": 1}
            settings = archive_settings(tmp_path, inbox, emu, versions=("original", "mastered"))
            settings = settings.model_copy(
                update={
                    "analysis": settings.analysis.model_copy(update={"daily_audio_minutes": 0.5 / 60}),
                    "webhooks": WebhooksConfig(urls=(receiver.url,)),
                    "metrics": MetricsConfig(enabled=True, port=0),
                }
            )
            d = run_daemon(settings)
            write_tone(inbox / "one.wav", 0.4, freq=300)
            write_tone(inbox / "two.wav", 0.4, freq=500)
            write_tone(inbox / "three.wav", 0.4, freq=700)
            wait_for(
                lambda: {b["event"] for b in receiver.bodies()} >= {"file.in_doubt", "spend.capped"},
                timeout=30,
                what="the in-doubt and cap webhooks",
            )
            host, port = wait_for(lambda: d.daemon.metrics_address)
            text = httpx.get(f"http://{host}:{port}/metrics").text
            d.stop()
        finally:
            receiver.server.stop()
    events = receiver.bodies()
    doubt = [b for b in events if b["event"] == "file.in_doubt"]
    assert doubt and doubt[0]["operation"] == "master" and doubt[0]["since"].endswith("Z")
    assert "answer was lost" in doubt[0]["error"] and doubt[0]["pipeline"] == "archive"
    (capped,) = [b for b in events if b["event"] == "spend.capped"]  # once a day, however many files wait
    assert capped["service"] == "analysis" and capped["cap_minutes"] == pytest.approx(0.5 / 60, abs=0.01)
    assert capped["budget"] == "analysis"  # service is its deprecated name, given until 0.4.0
    assert capped["resumes_at"].endswith("T00:00:00Z")
    assert 'watcher_paid_calls_total{operation="master",outcome="in_doubt",service="processing"} 1.0' in text
    assert 'watcher_paid_calls_total{operation="upload",outcome="answered",service="processing"}' in text
    assert 'watcher_paid_calls_total{operation="analyze",outcome="answered",service="analysis"} 1.0' in text
    assert 'watcher_audio_seconds_total{service="analysis"} 0.4' in text
    # the same counts under the new names (the ones above are deprecated, served until 0.4.0)
    assert 'watcher_paid_requests_total{budget="processing",ending="in_doubt",operation="master"} 1.0' in text
    assert 'watcher_paid_requests_total{budget="analysis",ending="answered",operation="analyze"} 1.0' in text
    assert 'watcher_paid_audio_seconds_total{budget="analysis"} 0.4' in text
