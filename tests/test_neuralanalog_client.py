"""The processing service client against its emulator over loopback: streamed uploads, the paid-call rule,
job states, retries, and downloads through signed URLs that never see the key."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import stat
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NA_KEY as KEY
from tests.conftest import Service, body, wait_for, write_silent_wav, write_tone
from watcher import fsutil
from watcher.errors import BadInput, NeedsUser, NotSent, Rejected, RetryLater
from watcher.safezip import TooLarge
from watcher.services.multipart import MultipartBody
from watcher.services.neuralanalog import ArchiveOffer, ExpiredURL, JobStatus, NeuralAnalogClient
from watcher.services.storage import RefusedRedirect, disposition_name

pytestmark = [
    pytest.mark.bill_exempt("the processing client alone, with no store: no ledger to hold the bill against"),
    pytest.mark.usefixtures("gate_stand_in"),
]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".watcher-tmp-")]


def test_upload_streams_the_exact_bytes(na: Service, tmp_path: Path) -> None:
    """The multipart upload carries the file byte for byte under its name, with an exact Content-Length."""
    audio = write_tone(tmp_path / 'Ça va "live".wav', 0.5)
    audio_id = na.run(lambda c: c.upload(body(audio)))
    stored = na.emu.objects[audio_id]
    assert stored.sha256 == sha(audio) == sha(stored.path)
    assert stored.name == 'Ça va "live".wav' and stored.params == {"file_source": "from_file"}
    (request,) = na.api.requests
    assert request.headers["X-API-Key"] == KEY
    assert "Transfer-Encoding" not in request.headers
    expected = MultipartBody("audio", body(audio), {"file_source": "from_file"}).length
    assert int(request.headers["Content-Length"]) == expected


def test_upload_memory_stays_flat(na: Service, tmp_path: Path) -> None:
    """A 32 MiB upload holds a few MiB at most (about 7 measured, whatever the size), on either side."""
    audio = write_silent_wav(tmp_path / "big.wav", 32)
    tracemalloc.start()
    try:
        audio_id = na.run(lambda c: c.upload(body(audio)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert na.emu.objects[audio_id].sha256 == sha(audio)
    assert peak < 12 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_each_job_kind_completes(na: Service, tmp_path: Path) -> None:
    """Upload, restore, master and stems: in progress at the first poll, complete at the next, params passed."""
    audio = write_tone(tmp_path / "a.wav", 0.3)

    async def flow(c: NeuralAnalogClient) -> dict[str, Any]:
        audio_id = await c.upload(body(audio))
        first = await c.status("audio", audio_id)
        restored = await c.restore(audio_id, {"preset": "universal_enhancer"})
        mastered = await c.master(audio_id, {"target_lufs": -14, "genre": "modern"}, upscaled_id=restored)
        split = await c.create_stems("mastered_id", mastered, {"preset": "4_tracks", "bit_depth": 24})
        ids = {"audio": audio_id, "upscaled": restored, "mastered": mastered, "stem_split": split}
        waiting = {k: await c.status(k, v) for k, v in ids.items()}
        done = {k: await c.status(k, v) for k, v in ids.items()}
        stems = await c.stem_objects(split)
        return {"first": first, "waiting": waiting, "done": done, "stems": stems, "ids": ids}

    out = na.run(flow)
    assert isinstance(out["first"], JobStatus) and not out["first"].is_complete and out["first"].status == "in_progress"
    assert all(s.is_complete and not s.is_failed for s in out["done"].values())
    assert not any(s.is_complete for k, s in out["waiting"].items() if k != "audio")
    assert [name for _, name in out["stems"]] == ["vocals", "drums", "bass", "other"]
    mastered = na.emu.objects[out["ids"]["mastered"]]
    assert mastered.params == {"target_lufs": -14, "genre": "modern", "audio_id": out["ids"]["audio"],
                               "upscaled_id": out["ids"]["upscaled"]}  # fmt: skip
    assert na.emu.objects[out["ids"]["stem_split"]].params["bit_depth"] == 24
    stem_status = na.run(lambda c: c.status("stem", out["stems"][0][0]))
    assert stem_status.is_complete and stem_status.audio_id == out["ids"]["audio"]


def test_failed_job_surfaces_its_message(na: Service, tmp_path: Path) -> None:
    """is_failed comes with the service's error_message."""
    audio = write_tone(tmp_path / "a.wav", 0.2)
    na.emu.faults.failed_kinds = {"upscaled"}
    na.emu.faults.polls_needed = 0

    async def flow(c: NeuralAnalogClient) -> JobStatus:
        return await c.status("upscaled", await c.restore(await c.upload(body(audio)), {}))

    status = na.run(flow)
    assert status.is_failed and not status.is_complete
    assert status.error_message == "emulated failure of upscaled"


def test_retry_after_is_honoured(na: Service, tmp_path: Path) -> None:
    """A 429 on a poll is retried after its Retry-After, not sooner."""
    na.emu.faults.retry_after = 0.4
    audio_id = na.run(lambda c: c.upload(body(write_tone(tmp_path / "a.wav", 0.2))))
    na.emu.faults.status_429 = {"GET /status": 1}
    started = time.monotonic()
    na.run(lambda c: c.status("audio", audio_id))
    assert time.monotonic() - started >= 0.4
    assert na.api.counts()["GET /status"] == 2


def test_server_errors_are_retried_for_reads(na: Service, tmp_path: Path) -> None:
    """500s on status polls and archive offers are retried in-process until the answer comes."""
    na.emu.faults.polls_needed = 0
    audio_id = na.run(lambda c: c.upload(body(write_tone(tmp_path / "a.wav", 0.2))))
    na.emu.faults.status_500 = {"GET /status": 2, "POST /download-archive": 1}

    async def flow(c: NeuralAnalogClient) -> tuple[JobStatus, ArchiveOffer]:
        return await c.status("audio", audio_id), await c.request_archive(audio_id=audio_id, versions=["original"])

    status, offer = na.run(flow)
    assert status.is_complete and offer.download_url
    assert na.api.counts()["GET /status"] == 3 and na.api.counts()["POST /download-archive"] == 2


@pytest.mark.parametrize(
    "route", ["POST /from-file", "POST /upscale-audio", "POST /master-audio", "POST /create-stems"]
)
def test_paid_post_is_not_resent_after_a_500(na: Service, tmp_path: Path, route: str) -> None:
    """A 500 on a paid call goes back to the caller as RetryLater; the call was made exactly once."""
    audio = write_tone(tmp_path / "a.wav", 0.2)
    audio_id = na.run(lambda c: c.upload(body(audio)))
    na.emu.faults.status_500 = {route: 1}
    call = {
        "POST /from-file": lambda c: c.upload(body(audio)),
        "POST /upscale-audio": lambda c: c.restore(audio_id, {}),
        "POST /master-audio": lambda c: c.master(audio_id, {}),
        "POST /create-stems": lambda c: c.create_stems("audio_id", audio_id, {"preset": "2_tracks"}),
    }[route]
    with pytest.raises(RetryLater, match="HTTP 500") as err:
        na.run(call)
    assert not isinstance(err.value, NotSent)
    assert na.api.counts()[route] == (2 if route == "POST /from-file" else 1)


def test_paid_post_refused_with_429_is_not_sent_and_not_resent_here(na: Service, tmp_path: Path) -> None:
    """A 429 means the service did nothing: NotSent after one request; sending again is the gate's next take."""
    audio = write_tone(tmp_path / "a.wav", 0.2)
    na.emu.faults.status_429 = {"POST /from-file": 1}
    with pytest.raises(NotSent):
        na.run(lambda c: c.upload(body(audio)))
    assert na.api.counts()["POST /from-file"] == 1 and not na.emu.objects


def test_upload_cut_off_mid_body_is_not_sent(na: Service, tmp_path: Path) -> None:
    """The connection dropped before the body was sent in full: nothing was accepted (NotSent), nothing resent."""
    audio = write_silent_wav(tmp_path / "big.wav", 32)
    na.emu.faults.drop_upload_after = 256 << 10
    with pytest.raises(NotSent, match="partial body"):
        na.run(lambda c: c.upload(body(audio)))
    assert na.api.counts()["POST /from-file"] == 1 and not na.emu.objects


def test_lost_answer_after_a_whole_upload_is_not_resent(na: Service, tmp_path: Path) -> None:
    """The service took the whole upload but the answer was lost: RetryLater for the caller, no resend."""
    audio = write_tone(tmp_path / "a.wav", 0.2)
    na.emu.faults.lose_answer = {"POST /from-file": 1}
    with pytest.raises(RetryLater) as err:
        na.run(lambda c: c.upload(body(audio)))
    assert not isinstance(err.value, NotSent)
    assert na.api.counts()["POST /from-file"] == 1 and len(na.emu.objects) == 1  # why a resend would pay twice


def test_unreachable_service_is_not_sent(na: Service, tmp_path: Path) -> None:
    """Nobody listening: NotSent after the in-process attempts (safe to resend later, even when paid)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    audio = write_tone(tmp_path / "a.wav", 0.2)
    with pytest.raises(NotSent):
        na.run(lambda c: c.upload(body(audio)), url=f"http://127.0.0.1:{port}")


def test_account_and_request_problems_need_the_user(na: Service, tmp_path: Path) -> None:
    """402 is an account problem and 422 carries its detail; no message contains the key."""
    audio = write_tone(tmp_path / "a.wav", 0.2)
    na.emu.faults.fail_with = {"POST /from-file": [402]}
    with pytest.raises(NeedsUser, match="out of credits") as err:
        na.run(lambda c: c.upload(body(audio)))
    assert err.value.status == 402 and KEY not in str(err.value)
    audio_id = na.run(lambda c: c.upload(body(audio)))
    with pytest.raises(Rejected, match="preset: must be one of") as refused:
        na.run(lambda c: c.create_stems("audio_id", audio_id, {"preset": "9_tracks"}))
    assert refused.value.status == 422 and refused.value.final is False
    with pytest.raises(NeedsUser, match="API key was refused"):
        na.run(lambda c: c.status("audio", audio_id), key="wrong-key-999")


@pytest.mark.parametrize("refusal", [403, 404, 410])
def test_download_object_follows_307_without_the_key(na: Service, tmp_path: Path, refusal: int) -> None:
    """GET /download answers 307; storage never sees a credential; an expired URL is asked for again."""
    audio = write_tone(tmp_path / "a.wav", 0.2)
    na.emu.faults.polls_needed = 0
    na.emu.faults.expired_urls, na.emu.faults.expired_status = 1, refusal
    dest = tmp_path / "out" / "a.wav"

    async def flow(c: NeuralAnalogClient) -> int:
        return await c.download_object("audio", await c.upload(body(audio)), dest, "wav", track=True)

    assert na.run(flow) == audio.stat().st_size
    assert sha(dest) == sha(audio)
    assert na.api.counts()["GET /download"] == 2 and len(na.storage.requests) == 2
    assert na.api.requests[-1].query == {"format": ["wav"], "track": ["true"]}
    for r in na.storage.requests:
        assert not {k.lower() for k in r.headers} & {"x-api-key", "authorization", "cookie"}
    assert no_temp_files(tmp_path / "out")


def test_urls_that_keep_expiring_end_in_expired_url(na: Service, tmp_path: Path) -> None:
    """URLs expiring at once: the API is asked three times, then ExpiredURL; no file is left."""
    na.emu.faults.polls_needed, na.emu.faults.url_ttl = 0, 0.0
    audio_id = na.run(lambda c: c.upload(body(write_tone(tmp_path / "a.wav", 0.2))))
    with pytest.raises(ExpiredURL):
        na.run(lambda c: c.download_object("audio", audio_id, tmp_path / "out" / "a.wav"))
    assert na.api.counts()["GET /download"] == 3
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_truncated_and_failing_downloads(na: Service, tmp_path: Path) -> None:
    """A cut-off transfer or a storage 500 is retried; when it keeps failing, RetryLater and no partial file."""
    na.emu.faults.polls_needed = 0
    audio = write_tone(tmp_path / "a.wav", 1.0)
    audio_id = na.run(lambda c: c.upload(body(audio)))
    na.emu.faults.truncate_downloads, na.emu.faults.storage_500 = 1, 1
    dest = tmp_path / "out" / "a.wav"
    assert na.run(lambda c: c.download_object("audio", audio_id, dest)) == audio.stat().st_size
    assert sha(dest) == sha(audio) and len(na.storage.requests) == 3
    dest.unlink()
    na.emu.faults.truncate_downloads = 10
    with pytest.raises(RetryLater) as err:
        na.run(lambda c: c.download_object("audio", audio_id, dest))
    assert not isinstance(err.value, ExpiredURL)
    assert list((tmp_path / "out").iterdir()) == []


def test_archive_is_streamed_to_disk(na: Service, tmp_path: Path) -> None:
    """Two audio IDs in one zip: every version inside, byte for byte, labelled as emulated."""
    na.emu.faults.polls_needed = 0
    a, b = write_tone(tmp_path / "one.wav", 0.3), write_tone(tmp_path / "two.wav", 0.3, freq=220)

    async def flow(c: NeuralAnalogClient) -> tuple[ArchiveOffer, int, list[str]]:
        ids = [await c.upload(body(a)), await c.upload(body(b))]
        for audio_id in ids:
            await c.master(audio_id, {})
        offer = await c.request_archive(ids=ids, versions=["original", "mastered"], format="flac")
        assert offer.download_url
        return offer, await c.download_archive(offer.download_url, tmp_path / "dl" / "x.zip"), ids

    offer, size, _ = na.run(flow)
    assert offer.expires_in_seconds == 86400 and not offer.archive_incomplete and not offer.email_notification_queued
    zip_path = tmp_path / "dl" / "x.zip"
    assert size == zip_path.stat().st_size and no_temp_files(tmp_path / "dl")
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(zf.namelist())
        assert hashlib.sha256(zf.read("one/one (original).wav")).hexdigest() == sha(a)
        note = zf.read("EMULATED.txt").decode()
    assert names == sorted(
        ["EMULATED.txt", "one/one (original).wav", "one/one (mastered).wav", "two/two (original).wav",
         "two/two (mastered).wav"]
    )  # fmt: skip
    assert "original: flac was asked for; this is WAV" in note


def test_archive_offer_without_a_url(na: Service, tmp_path: Path) -> None:
    """An e-mail-queued offer has no URL; mixing track and stem versions is refused before any request."""
    na.emu.faults.polls_needed, na.emu.faults.email_queued = 0, 1
    audio_id = na.run(lambda c: c.upload(body(write_tone(tmp_path / "a.wav", 0.2))))
    offer = na.run(lambda c: c.request_archive(audio_id=audio_id, versions=["original"]))
    assert offer.email_notification_queued and offer.download_url is None
    assert offer.email_notification_threshold_seconds == 60
    with pytest.raises(ValueError, match="separate"):
        na.run(lambda c: c.request_archive(audio_id=audio_id, versions=["original", "mastered_stems"]))
    assert na.api.counts()["POST /download-archive"] == 1


# -- downloads bounded by what their source can justify ------------------------------------------------------


@pytest.fixture
def odd_storage() -> Any:
    """A loopback storage host whose answers tests choose: ``routes[path] = handler(req)``."""
    from watcher.emulator.server import App, HTTPServerThread

    app = App()
    routes: dict[str, Any] = {}

    @app.route("GET", r"/(?P<name>[\w.-]+)", "GET")
    def handle(req: Any) -> None:
        routes[req.param("name")](req)

    server = HTTPServerThread([app]).start()
    server.routes = routes  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


def test_download_over_its_bound_is_refused_by_content_length(na: Service, tmp_path: Path) -> None:
    """A Content-Length above ``max_bytes`` is TooLarge before a byte is written, and not retried."""
    na.emu.faults.polls_needed = 0
    audio = write_tone(tmp_path / "a.wav", 1.0)
    audio_id = na.run(lambda c: c.upload(body(audio)))
    dest = tmp_path / "out" / "a.wav"
    with pytest.raises(TooLarge, match=rf"announced {audio.stat().st_size} bytes for a\.wav, more than the 1000"):
        na.run(lambda c: c.download_object("audio", audio_id, dest, max_bytes=1000))
    assert len(na.storage.requests) == 1 and not dest.exists()
    assert not (tmp_path / "out").exists() or no_temp_files(tmp_path / "out")
    assert na.run(lambda c: c.download_object("audio", audio_id, dest, max_bytes=audio.stat().st_size)) > 0
    assert sha(dest) == sha(audio)


def test_download_without_a_length_is_counted_while_writing(na: Service, odd_storage: Any, tmp_path: Path) -> None:
    """A body with no Content-Length that runs past ``max_bytes`` is cut off: TooLarge, no file, no temp file."""
    sent = {"bytes": 0}

    def endless(req: Any) -> None:
        # No Content-Length: the body is chunked and ends when the handler does.
        req.start(200, {"Content-Type": "application/octet-stream", "Connection": "close"})
        with contextlib.suppress(OSError):
            for _ in range(64):  # up to 64 MiB, unless the client hangs up first
                req.write(bytes(1 << 20))
                sent["bytes"] += 1 << 20

    odd_storage.routes["zeros.zip"] = endless
    dest = tmp_path / "dl" / "x.zip"
    with pytest.raises(TooLarge, match=r"sent more than 3000000 bytes for x\.zip"):
        na.run(lambda c: c.download_archive(f"{odd_storage.url}/zeros.zip", dest, max_bytes=3_000_000))
    assert not dest.exists() and no_temp_files(tmp_path / "dl")
    assert sent["bytes"] < 64 << 20


# -- names and redirects from the network -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "where"),
    [
        ("file:///etc/passwd", "file://"),
        ("ftp://127.0.0.1/x.zip?X-Signature=secret123", "ftp://127.0.0.1"),
        ("http://localhost:1/x.zip?X-Signature=secret123", "http://localhost"),
    ],
)
def test_refused_redirects(na: Service, odd_storage: Any, tmp_path: Path, location: str, where: str) -> None:
    """Storage redirecting off https and off the service's host is refused; the signature is never shown."""
    odd_storage.routes["x.zip"] = lambda req: req.redirect(location)
    dest = tmp_path / "dl" / "x.zip"
    with pytest.raises(RefusedRedirect) as err:
        na.run(lambda c: c.download_archive(f"{odd_storage.url}/x.zip?X-Signature=secret123", dest))
    assert isinstance(err.value, BadInput) and where in str(err.value) and "x.zip" in str(err.value)
    assert "secret123" not in str(err.value) and "passwd" not in str(err.value)
    assert len(odd_storage.requests) == 1 and not dest.exists()


def test_redirects_on_the_service_host_are_followed_up_to_five(na: Service, odd_storage: Any, tmp_path: Path) -> None:
    """Hops on the service's own host (loopback) are followed by hand; a sixth is refused."""
    payload = b"PK-not-really-a-zip" * 100

    def hop(req: Any) -> None:
        n = int(req.param("name").removeprefix("hop"))
        if n == 0:
            req.send_bytes(200, payload, "application/zip")
        else:
            req.redirect(f"/hop{n - 1}")

    for n in range(8):
        odd_storage.routes[f"hop{n}"] = hop
    dest = tmp_path / "dl" / "x.zip"
    assert na.run(lambda c: c.download_archive(f"{odd_storage.url}/hop5", dest)) == len(payload)
    assert dest.read_bytes() == payload and len(odd_storage.requests) == 6
    with pytest.raises(RefusedRedirect, match="more than 5 times"):
        na.run(lambda c: c.download_archive(f"{odd_storage.url}/hop6", tmp_path / "dl" / "y.zip"))
    assert not (tmp_path / "dl" / "y.zip").exists() and no_temp_files(tmp_path / "dl")


def test_content_disposition_never_chooses_the_path(na: Service, odd_storage: Any, tmp_path: Path) -> None:
    """A hostile Content-Disposition file name changes nothing: the body lands where the caller said."""
    odd_storage.routes["x.zip"] = lambda req: req.send_bytes(
        200, b"data", "application/zip", {"Content-Disposition": 'attachment; filename="../../escaped.zip"'}
    )
    dest = tmp_path / "a" / "b" / "x.zip"
    assert na.run(lambda c: c.download_archive(f"{odd_storage.url}/x.zip", dest)) == 4
    assert dest.read_bytes() == b"data" and not (tmp_path / "escaped.zip").exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["x.zip"]
    assert disposition_name('attachment; filename="../../escaped.zip"', "f") == "escaped.zip"
    assert disposition_name("attachment; filename*=UTF-8''%2E%2E%2F%C3%A9t%C3%A9.wav", "f") == "été.wav"
    assert disposition_name(None, "fallback") == "fallback"


def test_stem_names_from_status_details_are_made_safe(na: Service, tmp_path: Path) -> None:
    """Hostile stem names in status_details come back as one safe file name each (or "" to be named)."""
    na.emu.faults.polls_needed = 0
    audio = write_tone(tmp_path / "a.wav", 0.3)

    async def flow(c: NeuralAnalogClient) -> list[tuple[str, str]]:
        split = await c.create_stems("audio_id", await c.upload(body(audio)), {"preset": "4_tracks"})
        obj = na.emu.objects[split]
        obj.stems = list(zip([s for s, _ in obj.stems], ["../../evil", "", ".hidden", "a/b"], strict=True))
        return await c.stem_objects(split)

    assert [name for _, name in na.run(flow)] == ["evil", "", "hidden", "a_b"]


def test_download_temp_is_private_until_renamed(na: Service, odd_storage: Any, tmp_path: Path) -> None:
    """While a body streams in, its temp file is 0600; once complete it has the umask's mode."""
    release = threading.Event()

    def slow(req: Any) -> None:
        req.start(200, {"Content-Length": str(2 << 20)})
        req.write(bytes(1 << 20))
        release.wait(10)
        req.write(bytes(1 << 20))

    odd_storage.routes["slow.zip"] = slow
    dest = tmp_path / "dl" / "slow.zip"
    result: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: result.update(n=na.run(lambda c: c.download_archive(f"{odd_storage.url}/slow.zip", dest)))
    )
    worker.start()
    try:
        temp = wait_for(lambda: next((tmp_path / "dl").glob(".watcher-tmp-*"), None), what="the temp file")
        assert stat.S_IMODE(temp.stat().st_mode) == 0o600
    finally:
        release.set()
        worker.join(15)
    assert result["n"] == 2 << 20 and stat.S_IMODE(dest.stat().st_mode) == fsutil.file_mode()
