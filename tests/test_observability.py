"""Metrics and webhooks: what a monitoring system scrapes, and what a receiver is sent."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_settings, wait_for, write_tone
from watcher.config import MetricsConfig, WebhooksConfig
from watcher.emulator import App, HTTPServerThread, Request

pytestmark = pytest.mark.timeout(60)


class Receiver:
    """A loopback webhook receiver that fails its first ``fail`` requests with 500."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.bodies: list[tuple[dict, str]] = []
        self.lock = threading.Lock()
        app = App()
        app.route("POST", "/hook", "POST /hook")(self.handle)
        self.server = HTTPServerThread([app]).start()
        self.url = self.server.url + "/hook"

    def handle(self, req: Request) -> None:
        raw = req.body()
        with self.lock:
            if self.fail > 0:
                self.fail -= 1
                req.send_json(500, {"detail": "down"})
                return
            self.bodies.append((json.loads(raw), req.headers.get("X-Watcher-Signature", "")))
        req.send_json(200, {"ok": True})


def test_metrics_endpoint(tmp_path, inbox, emulator, run_daemon):
    """/metrics shows files seen and done, queue depth, service latency and bytes uploaded."""
    settings = make_settings(tmp_path, inbox, emulator.url).model_copy(
        update={"metrics": MetricsConfig(enabled=True, port=0)}
    )
    d = run_daemon(settings)
    audio = write_tone(inbox / "m.wav", 0.3)
    wait_for(lambda: (inbox / "m.wav.analysis.json").exists())
    wait_for(lambda: d.daemon.metrics_address is not None)
    host, port = d.daemon.metrics_address
    text = wait_for(
        lambda: (
            (t := httpx.get(f"http://{host}:{port}/metrics").text)
            and 'watcher_files_done_total{stage="analyze"} 1.0' in t
            and t
        )
    )
    d.stop()
    assert f'watcher_files_seen_total{{folder="{inbox}"}} 1.0' in text
    assert 'watcher_service_request_seconds_count{service="analysis service"} 1.0' in text
    assert f'watcher_bytes_uploaded_total{{service="analysis service"}} {float(audio.stat().st_size)}' in text
    assert "watcher_queue_depth" in text


def test_webhooks_for_done_and_failed(tmp_path, inbox, emulator, run_daemon):
    """A done and a failed file each reach the receiver, signed, even though it failed twice first."""
    receiver = Receiver(fail=2)
    try:
        hooks = WebhooksConfig(urls=(receiver.url,), secret="hook-secret-123")
        settings = make_settings(tmp_path, inbox, emulator.url).model_copy(update={"webhooks": hooks})
        d = run_daemon(settings)
        write_tone(inbox / "good.wav", 0.3)
        (inbox / "bad.wav").write_text("no audio here")
        wait_for(lambda: len(receiver.bodies) == 2, timeout=30, what="two webhook deliveries")
        d.stop()
    finally:
        receiver.server.stop()
    events = {Path(b["path"]).name: b for b, _ in receiver.bodies}
    assert events["good.wav"]["event"] == "file.done" and events["good.wav"]["pipeline"] == "analyze"
    assert events["good.wav"]["sidecar"].endswith("good.wav.analysis.json")
    assert events["bad.wav"]["event"] == "file.failed" and "not audio" in events["bad.wav"]["error"]
    for body, signature in receiver.bodies:
        raw = json.dumps(body).encode()
        assert signature == "sha256=" + hmac.new(b"hook-secret-123", raw, hashlib.sha256).hexdigest()
        assert "hook-secret-123" not in raw.decode()


def test_dead_webhook_url_does_not_hurt(tmp_path, inbox, emulator, run_daemon):
    """A receiver that is not there costs a log line, never the file's processing."""
    hooks = WebhooksConfig(urls=("http://127.0.0.1:9/hook",))
    settings = make_settings(tmp_path, inbox, emulator.url).model_copy(update={"webhooks": hooks})
    d = run_daemon(settings)
    write_tone(inbox / "x.wav", 0.2)
    wait_for(lambda: (inbox / "x.wav.analysis.json").exists())
    assert d.stop() == 0
