"""Webhooks: what a loopback receiver is sent, retried, dropped and signed."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from tests.conftest import Receiver
from watcher import __version__
from watcher.webhooks import WebhookSender

pytestmark = pytest.mark.timeout(30)
FAST = {"wait_initial": 0.01, "wait_max": 0.05, "wait_jitter": 0.0}
SECRET = "hook-secret-7f3a"
PAYLOAD = {
    "path": "/srv/audio/inbox/take 1.wav",
    "pipeline": "analyze",
    "state": "done",
    "error": None,
    "sidecar": "/srv/audio/inbox/take 1.wav.analysis.json",
}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A receiver that accepts everything."""
    r = Receiver()
    yield r
    r.server.stop()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_sender(sender: WebhookSender, *events: tuple[str, dict[str, Any]], deadline: float = 10.0) -> int:
    """Start the sender, send the events, close it with a deadline; returns what aclose reported unsent."""

    async def main() -> int:
        sender.start()
        for event, payload in events:
            await sender.send(event, payload)
        return await sender.aclose(deadline)

    return asyncio.run(main())


def test_receiver_gets_the_signed_json(receiver):
    """A file.done event arrives once as JSON with the envelope, the payload and a valid HMAC signature."""
    sender = WebhookSender([receiver.url], secret=SECRET, **FAST)
    assert run_sender(sender, ("file.done", PAYLOAD)) == 0
    assert sender.delivered == 1 and sender.failed == 0
    [(raw, headers)] = receiver.received
    body = json.loads(raw)
    assert body["event"] == "file.done" and body["watcher_version"] == __version__
    assert body["timestamp"].endswith("Z") and len(body["id"]) == 32 and body["host"]
    assert {k: body[k] for k in PAYLOAD} == PAYLOAD
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Watcher-Event"] == "file.done" and headers["X-Watcher-Delivery"] == body["id"]
    assert headers["X-Watcher-Signature"] == "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    assert SECRET not in raw.decode() and SECRET not in repr(sender)


def test_payload_cannot_override_the_envelope(receiver):
    """A payload key named like an envelope field is ignored; an unsigned sender sends no signature."""
    sender = WebhookSender([receiver.url], **FAST)
    run_sender(sender, ("file.failed", {"path": "/a.wav", "event": "forged", "error": "not audio"}))
    [(raw, headers)] = receiver.received
    body = json.loads(raw)
    assert body["event"] == "file.failed" and body["error"] == "not audio"
    assert "X-Watcher-Signature" not in headers


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_failing_receiver_gets_it_on_the_third_try(status):
    """Two failures (5xx, or 429 with Retry-After) then success: three requests, one delivery, one id."""
    receiver = Receiver(script=(status, status))
    try:
        sender = WebhookSender([receiver.url], secret=SECRET, **FAST)
        assert run_sender(sender, ("file.done", PAYLOAD)) == 0
    finally:
        receiver.server.stop()
    bodies = receiver.bodies()
    assert len(bodies) == 3
    assert len({b["id"] for b in bodies}) == 1, "a retry is the same delivery"
    assert sender.delivered == 1 and sender.failed == 0


def test_a_client_error_is_not_retried():
    """A 4xx answer is final: one request, counted as failed, logged with the status but not the URL's token."""
    receiver = Receiver(script=(404,))
    try:
        sender = WebhookSender([receiver.url], **FAST)
        with structlog.testing.capture_logs() as logs:
            run_sender(sender, ("file.done", PAYLOAD))
    finally:
        receiver.server.stop()
    assert len(receiver.received) == 1 and sender.failed == 1 and sender.delivered == 0
    [refused] = [e for e in logs if e["event"] == "webhook.refused"]
    assert refused["status"] == 404 and refused["path"] == PAYLOAD["path"]
    assert "tok3n" not in repr(logs)


def test_a_dead_url_does_not_raise():
    """Nothing listening: the attempts fail, one warning is logged, and send and aclose return normally."""
    url = f"http://127.0.0.1:{closed_port()}/hooks/tok3n"
    sender = WebhookSender([url], secret=SECRET, attempts=3, **FAST)
    with structlog.testing.capture_logs() as logs:
        assert run_sender(sender, ("file.failed", PAYLOAD), ("file.done", PAYLOAD)) == 0
    assert sender.failed == 2 and sender.delivered == 0
    failed = [e for e in logs if e["event"] == "webhook.failed"]
    assert len(failed) == 2 and "could not be reached: ConnectError" in failed[0]["error"]
    assert SECRET not in repr(logs) and "tok3n" not in repr(logs)


def test_an_invalid_url_does_not_raise():
    """A URL httpx cannot even use is a logged failure, not an exception in the daemon."""
    sender = WebhookSender(["ftp://example.invalid/x", "http://"], **FAST)
    assert run_sender(sender, ("file.done", PAYLOAD)) == 0
    assert sender.failed == 2


def test_every_url_gets_every_event(receiver):
    """Two URLs, two events: each URL receives both, in order."""
    other = Receiver()
    try:
        sender = WebhookSender([receiver.url, other.url], **FAST)
        run_sender(sender, ("file.done", {"path": "/1.wav"}), ("file.failed", {"path": "/2.wav"}))
    finally:
        other.server.stop()
    for r in (receiver, other):
        assert [(b["event"], b["path"]) for b in r.bodies()] == [("file.done", "/1.wav"), ("file.failed", "/2.wav")]
    assert sender.delivered == 4


def test_a_full_queue_drops_the_oldest(receiver):
    """With room for two, a third event pushes the first out (with a warning); the newer two are sent."""
    sender = WebhookSender([receiver.url], queue_size=2, **FAST)

    async def main() -> int:
        with structlog.testing.capture_logs() as logs:
            for n in (1, 2, 3):
                await sender.send("file.done", {"path": f"/{n}.wav"})
        assert [(e["event"], e["path"]) for e in logs] == [("webhook.dropped", "/1.wav")]
        sender.start()
        return await sender.aclose(10)

    assert asyncio.run(main()) == 0
    assert [b["path"] for b in receiver.bodies()] == ["/2.wav", "/3.wav"]
    assert sender.dropped == 1


def test_close_gives_up_after_its_deadline():
    """A receiver that does not answer cannot hold the daemon's stop: aclose returns after its deadline."""
    gate = threading.Event()
    receiver = Receiver(gate=gate)
    try:
        sender = WebhookSender([receiver.url], **FAST)

        async def main() -> tuple[int, float]:
            loop = asyncio.get_running_loop()
            sender.start()
            await sender.send("file.done", {"path": "/slow.wav"})
            await sender.send("file.done", {"path": "/queued.wav"})
            started = loop.time()
            unsent = await sender.aclose(0.3)
            return unsent, loop.time() - started

        with structlog.testing.capture_logs() as logs:
            unsent, took = asyncio.run(main())
    finally:
        gate.set()
        receiver.server.stop()
    assert unsent == 2 and sender.dropped == 2 and sender.delivered == 0
    assert took < 3
    assert [e["events"] for e in logs if e["event"] == "webhook.unsent"] == [2]
