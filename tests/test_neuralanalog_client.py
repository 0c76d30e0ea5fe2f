"""The processing service client against the emulator: streamed uploads, the paid-call rule, downloads."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from tests.conftest import write_tone
from watcher.audiofile import FileBody, signature
from watcher.emulator import Emulator
from watcher.errors import ExpiredURL, NeedsUser, RetryLater
from watcher.services.http import HttpPolicy
from watcher.services.neuralanalog import NeuralAnalogClient

KEY = "na-key-123456"
FAST = HttpPolicy(wait_initial=0.02, wait_max=0.1, wait_jitter=0.01, attempts=3)


@pytest.fixture
def emu():
    with Emulator(processing_key=KEY, use_local=False) as e:
        e.processing.faults.polls_needed = 0
        yield e


def run(emu: Emulator, fn, key: str = KEY):
    async def go():
        client = NeuralAnalogClient(emu.url, key, policy=FAST)
        try:
            return await fn(client)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_upload_streams_the_exact_bytes(emu, tmp_path):
    """The multipart upload carries the file byte for byte, with its name, and returns an audio_id."""
    audio = write_tone(tmp_path / "Ça va.wav", 0.5)
    audio_id = run(emu, lambda c: c.upload(FileBody(audio, signature(audio))))
    stored = emu.processing.objects[audio_id]
    assert hashlib.sha256(stored.path.read_bytes()).digest() == hashlib.sha256(audio.read_bytes()).digest()
    assert stored.name == "Ça va.wav"
    (request,) = emu.api.requests
    assert request.headers["X-API-Key"] == KEY
    assert int(request.headers["Content-Length"]) > audio.stat().st_size


def test_paid_post_is_not_resent_after_a_500(emu, tmp_path):
    """A 500 on a paid call goes back to the caller (the store decides), instead of an in-process resend."""
    audio = write_tone(tmp_path / "a.wav", 0.2)
    audio_id = run(emu, lambda c: c.upload(FileBody(audio, signature(audio))))
    emu.processing.faults.status_500 = {"POST /master-audio": 1}
    with pytest.raises(RetryLater, match="HTTP 500"):
        run(emu, lambda c: c.master(audio_id, {"target_lufs": -14}))
    assert emu.api.counts()["POST /master-audio"] == 1


def test_paid_post_is_resent_after_a_429(emu, tmp_path):
    """A 429 means the service did nothing: the paid call is sent again after Retry-After."""
    audio = write_tone(tmp_path / "a.wav", 0.2)
    emu.processing.faults.status_429 = {"POST /from-file": 1}
    run(emu, lambda c: c.upload(FileBody(audio, signature(audio))))
    assert emu.api.counts()["POST /from-file"] == 2


def test_jobs_and_status(emu, tmp_path):
    """Restore, master and stems return IDs whose status completes; a failed kind reports its message."""
    audio = write_tone(tmp_path / "a.wav", 0.2)
    emu.processing.faults.failed_kinds = {"upscaled"}

    async def flow(c: NeuralAnalogClient):
        audio_id = await c.upload(FileBody(audio, signature(audio)))
        mastered = await c.master(audio_id, {"genre": "modern"})
        restored = await c.restore(audio_id, {"preset": "universal_enhancer"})
        stems = await c.create_stems("mastered_id", mastered, {"preset": "2_tracks"})
        return (await c.status("mastered", mastered), await c.status("upscaled", restored), await c.stem_objects(stems))

    mastered, restored, stems = run(emu, flow)
    assert mastered.is_complete and not mastered.is_failed
    assert restored.is_failed and restored.error_message == "emulated failure of upscaled"
    assert [name for _, name in stems] == ["vocals", "accompaniment"]


def test_download_object_follows_307_without_the_key(emu, tmp_path):
    """GET /download answers 307; storage gets no X-API-Key, an expired URL is asked for again."""
    audio = write_tone(tmp_path / "a.wav", 0.2)
    emu.processing.faults.expired_urls = 1

    async def flow(c: NeuralAnalogClient):
        audio_id = await c.upload(FileBody(audio, signature(audio)))
        return await c.download_object("audio", audio_id, tmp_path / "out" / "a.wav", format="wav")

    size = run(emu, flow)
    assert size == audio.stat().st_size
    assert (tmp_path / "out" / "a.wav").read_bytes() == audio.read_bytes()
    assert emu.api.counts()["GET /download"] == 2
    assert len(emu.storage.requests) == 2
    assert all("x-api-key" not in {k.lower() for k in r.headers} for r in emu.storage.requests)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".watcher-tmp-")]


def test_expired_archive_url_raises_for_the_caller(emu, tmp_path):
    """A refused archive URL is ExpiredURL (the caller asks for a new archive), leaving no partial file."""
    emu.processing.faults.expired_urls = 5
    url = emu.storage.url + "/signed/unknown"
    with pytest.raises(ExpiredURL):
        run(emu, lambda c: c.download_archive(url, tmp_path / "x.zip"))
    assert not list(tmp_path.glob("*x.zip"))


def test_bad_key_needs_the_user(emu, tmp_path):
    """A refused X-API-Key is an account problem, reported without the key."""
    audio = write_tone(tmp_path / "a.wav", 0.2)
    with pytest.raises(NeedsUser, match="API key was refused") as err:
        run(emu, lambda c: c.upload(FileBody(audio, signature(audio))), key="wrong-key-999")
    assert "wrong-key-999" not in str(err.value)


def test_archive_offer_fields(emu, tmp_path):
    """The archive offer exposes the URL and both awkward flags."""
    audio = write_tone(tmp_path / "a.wav", 0.2)
    emu.processing.faults.email_queued = 1

    async def flow(c: NeuralAnalogClient):
        audio_id = await c.upload(FileBody(audio, signature(audio)))
        first = await c.request_archive(audio_id=audio_id, versions=["original"], format="wav", formats={})
        second = await c.request_archive(audio_id=audio_id, versions=["original"], format="wav", formats={})
        n = await c.download_archive(second.download_url, tmp_path / "a.zip")
        return first, second, n

    first, second, n = run(emu, flow)
    assert first.email_notification_queued and first.download_url is None
    assert second.download_url and not second.archive_incomplete and n == Path(tmp_path / "a.zip").stat().st_size
