"""Client of the processing and archive service (Neural Analog): upload, process, poll, download.

Every API call carries ``X-API-Key``; downloads follow the service's 307 to a signed storage URL by hand,
with a separate HTTP client that never sends the key. Paid calls (upload, restore, master, stems) are
resent in-process only when they provably never reached the service or got a 429; any other failure goes
back to the caller (the store schedules it), since the service may have done the work.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import structlog

from watcher.errors import ExpiredURL, NeedsUser, RetryLater
from watcher.fsutil import TEMP_PREFIX, fsync_dir
from watcher.services.http import AudioSource, HttpPolicy, ServiceHTTP, translate_transport_error

log = structlog.get_logger("watcher.processing")
SERVICE = "processing service"
STORAGE = "storage host"
EXPIRED = (403, 404, 410)


@dataclass(frozen=True)
class JobStatus:
    """``GET /status/{type}/{id}``; drive state from the two booleans, the rest is informational."""

    object_type: str
    object_id: str
    is_complete: bool
    is_failed: bool
    status: str | None = None
    error_message: str | None = None
    download_url: str | None = None
    audio_id: str | None = None
    status_details: Any = None


@dataclass(frozen=True)
class ArchiveOffer:
    """``POST /download-archive``: a zip URL, or the reasons there is none (or not everything is in it)."""

    download_url: str | None
    expires_in_seconds: int | None = None
    email_notification_queued: bool = False
    email_notification_threshold_seconds: int | None = None
    archive_incomplete: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _multipart(source: AudioSource, boundary: str) -> tuple[int, AsyncIterator[bytes]]:
    """A multipart/form-data body with one file field ``audio``, streamed, and its exact length."""
    safe = source.name.replace('"', "%22").replace("\r", "").replace("\n", "")
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="{safe}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = (
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="file_source"\r\n\r\nfrom_file\r\n--{boundary}--\r\n'
    ).encode()

    async def body() -> AsyncIterator[bytes]:
        yield head
        async for chunk in source.chunks():
            yield chunk
        yield tail

    return len(head) + source.size + len(tail), body()


class NeuralAnalogClient:
    """Typed client for the processing service; knows nothing of folders or the store."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        policy: HttpPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = ServiceHTTP(SERVICE, base_url, headers=headers, policy=policy, transport=transport)
        p = self.http.policy
        # Storage gets its own client: no default headers at all, so the key cannot leak there.
        self.storage = httpx.AsyncClient(
            timeout=httpx.Timeout(p.read_timeout, connect=p.connect_timeout), follow_redirects=False
        )

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.storage.aclose()

    async def check(self) -> str:
        """One cheap authenticated call: the status of an ID that does not exist."""
        return await self.http.probe("GET", "/status/audio/watcher-doctor-check")

    # -- paid calls ----------------------------------------------------------------------------------------

    async def upload(self, source: AudioSource) -> str:
        """``POST /from-file`` with the file streamed as multipart; returns the ``audio_id``."""
        async for attempt in self.http.retrying(paid=True):
            with attempt:
                boundary = uuid.uuid4().hex
                length, body = _multipart(source, boundary)
                response = await self.http.request(
                    "POST",
                    "/from-file",
                    retry=False,
                    content=body,
                    headers={
                        "Content-Type": f"multipart/form-data; boundary={boundary}",
                        "Content-Length": str(length),
                    },
                )
                return self._id(response, "audio_id")
        raise AssertionError("unreachable")  # pragma: no cover

    async def restore(self, audio_id: str, params: Mapping[str, Any]) -> str:
        """``POST /upscale-audio``; returns the restored version's ``id``."""
        return await self._paid_json("/upscale-audio", {**params, "audio_id": audio_id}, "id")

    async def master(self, audio_id: str, params: Mapping[str, Any], upscaled_id: str | None = None) -> str:
        """``POST /master-audio``; returns the mastered version's ``id``."""
        body = {**params, "audio_id": audio_id}
        if upscaled_id:
            body["upscaled_id"] = upscaled_id
        return await self._paid_json("/master-audio", body, "id")

    async def create_stems(self, source_field: str, source_id: str, params: Mapping[str, Any]) -> str:
        """``POST /create-stems`` from ``audio_id``, ``upscaled_id`` or ``mastered_id``; returns ``creation_id``."""
        return await self._paid_json("/create-stems", {**params, source_field: source_id}, "creation_id")

    async def _paid_json(self, path: str, body: Mapping[str, Any], id_field: str) -> str:
        response = await self.http.request("POST", path, paid=True, json=dict(body))
        return self._id(response, id_field)

    @staticmethod
    def _id(response: httpx.Response, id_field: str) -> str:
        try:
            value = response.json().get(id_field)
        except (ValueError, AttributeError):
            value = None
        if not value:
            raise NeedsUser(f"{SERVICE} answered {response.status_code} without {id_field!r}: {response.text[:200]}")
        return str(value)

    # -- state ---------------------------------------------------------------------------------------------

    async def status(self, kind: str, object_id: str) -> JobStatus:
        """``GET /status/{kind}/{id}``."""
        response = await self.http.request("GET", f"/status/{kind}/{object_id}")
        data = response.json()
        return JobStatus(
            object_type=str(data.get("object_type", kind)),
            object_id=str(data.get("object_id", object_id)),
            is_complete=bool(data.get("is_complete")),
            is_failed=bool(data.get("is_failed")),
            status=data.get("status"),
            error_message=data.get("error_message"),
            download_url=data.get("download_url"),
            audio_id=data.get("audio_id"),
            status_details=data.get("status_details"),
        )

    async def stem_objects(self, creation_id: str) -> list[tuple[str, str]]:
        """The (stem_id, name) pairs of a finished split, read from ``status_details.stems``.

        The service documents per-stem downloads (``/download/stem/{id}``) but not where stem IDs are
        listed; we read them from the split's status details, as the emulator serves them.
        """
        details = (await self.status("stem_split", creation_id)).status_details or {}
        stems = details.get("stems", []) if isinstance(details, dict) else []
        return [(str(s["stem_id"]), str(s.get("name") or s["stem_id"])) for s in stems if "stem_id" in s]

    # -- downloads -----------------------------------------------------------------------------------------

    async def request_archive(
        self, *, audio_id: str, versions: Sequence[str], format: str, formats: Mapping[str, str]
    ) -> ArchiveOffer:
        """``POST /download-archive`` for one audio ID (tracks and stems are separate requests)."""
        body = {"id": audio_id, "versions": list(versions), "format": format, **formats}
        data = (await self.http.request("POST", "/download-archive", json=body)).json()
        known = {
            "download_url",
            "expires_in_seconds",
            "email_notification_queued",
            "email_notification_threshold_seconds",
            "archive_incomplete",
        }
        return ArchiveOffer(
            download_url=data.get("download_url"),
            expires_in_seconds=data.get("expires_in_seconds"),
            email_notification_queued=bool(data.get("email_notification_queued")),
            email_notification_threshold_seconds=data.get("email_notification_threshold_seconds"),
            archive_incomplete=bool(data.get("archive_incomplete")),
            extra={k: v for k, v in data.items() if k not in known},
        )

    async def download_archive(self, url: str, dest: Path) -> int:
        """Stream a zip from its (signed) URL to ``dest``; ExpiredURL when storage refuses it."""
        return await self._fetch(url, dest)

    async def download_object(self, kind: str, object_id: str, dest: Path, *, format: str) -> int:
        """``GET /download/{kind}/{id}``: follow the 307 to storage (without the key) and stream it to ``dest``."""
        for attempt in range(3):
            response = await self.http.request(
                "GET", f"/download/{kind}/{object_id}", params={"format": format, "track": "false"}
            )
            location = response.headers.get("Location")
            if response.status_code not in (301, 302, 303, 307, 308) or not location:
                raise NeedsUser(f"{SERVICE} answered {response.status_code} without a download location")
            try:
                return await self._fetch(str(response.url.join(location)), dest)
            except ExpiredURL:
                if attempt == 2:
                    raise
                log.info("download.url_expired", object=f"{kind}/{object_id}", next="asking for a fresh URL")
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fetch(self, url: str, dest: Path) -> int:
        """GET ``url`` from storage with no credentials; write atomically; check the length."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{dest.name}")
        written = 0
        try:
            async with self.storage.stream("GET", url) as response:
                if response.status_code in EXPIRED:
                    raise ExpiredURL(f"{STORAGE} refused the signed URL (HTTP {response.status_code})")
                if response.status_code >= 400:
                    raise RetryLater(f"{STORAGE} answered HTTP {response.status_code}", status=response.status_code)
                expected = response.headers.get("Content-Length")
                with tmp.open("wb") as out:
                    async for chunk in response.aiter_bytes(1 << 20):
                        out.write(chunk)
                        written += len(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            if expected is not None and int(expected) != written:
                raise RetryLater(f"{STORAGE} sent {written} of {expected} bytes")
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
            return written
        except (httpx.HTTPError, httpx.StreamError) as exc:
            raise translate_transport_error(exc, STORAGE) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
