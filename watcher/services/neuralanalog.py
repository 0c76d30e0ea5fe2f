"""Client of the processing and archive service (Neural Analog): upload, process, poll, download.

Every API call carries ``X-API-Key``. Downloads follow the API's 307 by hand with a second HTTP client
that has no default headers at all, so the key can never reach the storage host.

Paid calls (upload, restore, master, stems) are sent again in-process only when the service provably did
no work: the connection was never made (NotSent), the upload's body was not yet sent in full when the
connection failed (a partial multipart body cannot be accepted), or the service answered 429. A 5xx, a
timeout or a dropped connection after the whole request was sent is ambiguous (the job may exist): it
goes back to the caller as RetryLater, whose next attempt is the store's decision. Reads (status, archive
offers, downloads) are retried on any RetryLater.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import quote

import httpx
import structlog

from watcher.errors import BadInput, ExpiredURL, Malformed, NotSent, Rejected, RetryLater
from watcher.fsutil import PRIVATE_FILE, TEMP_PREFIX, chmod_quietly, file_mode, fsync_dir, safe_component
from watcher.names import display
from watcher.safezip import TooLarge
from watcher.services.http import (
    AudioSource,
    HttpPolicy,
    ServiceHTTP,
    parse_retry_after,
    translate_transport_error,
)
from watcher.services.multipart import MultipartBody

__all__ = ["ArchiveOffer", "AudioSource", "ExpiredURL", "JobStatus", "NeuralAnalogClient", "RefusedRedirect"]

log = structlog.get_logger("watcher.processing")
SERVICE = "processing service"
STORAGE = "storage host"
REDIRECTS = (301, 302, 303, 307, 308)
TRACK_VERSIONS = ("original", "restored", "mastered")
CHUNK = 1 << 20
MAX_HOPS = 5


class RefusedRedirect(BadInput):
    """A download was sent somewhere it must not go (not https, not the service's host, too many hops)."""

    kind = "bad_input"


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
    extra: dict[str, Any] = field(default_factory=dict)  # undocumented fields, kept for the logs


class NeuralAnalogClient:
    """Typed client for the processing service; knows nothing of folders or the store."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        policy: HttpPolicy | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        storage_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = ServiceHTTP(SERVICE, base_url, headers=headers, policy=policy, transport=transport)
        p = self.http.policy
        # Storage gets its own client with no default headers, so no credential can leak there. Its
        # redirects are followed by hand, each target checked (https, or the service's own host).
        self.storage = httpx.AsyncClient(
            timeout=httpx.Timeout(p.read_timeout, connect=p.connect_timeout),
            transport=storage_transport,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.storage.aclose()

    async def __aenter__(self) -> NeuralAnalogClient:
        return self

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def check(self) -> str:
        """One cheap authenticated call: the status of an ID that does not exist."""
        return await self.http.probe("GET", "/status/audio/watcher-doctor-check")

    # -- paid calls ----------------------------------------------------------------------------------------

    async def upload(self, source: AudioSource) -> str:
        """``POST /from-file``: the file streamed as multipart field ``audio``; returns the ``audio_id``.

        Resent in-process only on NotSent, 429, or a connection lost before the body was sent in full.
        """
        async for attempt in self.http.retrying(paid=True):
            with attempt:
                body = MultipartBody("audio", source, {"file_source": "from_file"})
                try:
                    response = await self.http.request(
                        "POST", "/from-file", retry=False, content=body, headers=body.headers
                    )
                except RetryLater as exc:
                    if exc.status is None and not isinstance(exc, NotSent) and not body.complete:
                        raise NotSent(
                            f"{SERVICE}: the connection failed after {body.sent} of {source.size} bytes of the "
                            f"upload ({exc}); a partial body cannot have been accepted"
                        ) from exc
                    raise
                return self._id(response, "audio_id")
        raise AssertionError("unreachable")  # pragma: no cover

    async def restore(self, audio_id: str, params: Mapping[str, Any]) -> str:
        """``POST /upscale-audio`` with ``params`` passed through; returns the restored version's ``id``."""
        return await self._paid_json("/upscale-audio", {**params, "audio_id": audio_id}, "id")

    async def master(self, audio_id: str, params: Mapping[str, Any], upscaled_id: str | None = None) -> str:
        """``POST /master-audio`` (of the restored version when ``upscaled_id``); returns its ``id``."""
        body = {**params, "audio_id": audio_id}
        if upscaled_id:
            body["upscaled_id"] = upscaled_id
        return await self._paid_json("/master-audio", body, "id")

    async def create_stems(self, source_field: str, source_id: str, params: Mapping[str, Any]) -> str:
        """``POST /create-stems`` from ``audio_id``, ``upscaled_id``, ``mastered_id`` or ``stem_id``; returns
        the ``creation_id``."""
        return await self._paid_json("/create-stems", {**params, source_field: source_id}, "creation_id")

    async def _paid_json(self, path: str, body: Mapping[str, Any], id_field: str) -> str:
        response = await self.http.request("POST", path, paid=True, json=dict(body))
        return self._id(response, id_field)

    @staticmethod
    def _id(response: httpx.Response, id_field: str) -> str:
        """The new object's ID; an answer without one is a service fault for this file (Malformed)."""
        try:
            value = response.json().get(id_field)
        except (ValueError, AttributeError):
            value = None
        if not value or not isinstance(value, str | int):
            raise Malformed(
                f"{SERVICE} answered {response.status_code} to {response.request.url.path} without {id_field!r}: "
                f"{response.text[:200]!r}"
            )
        return str(value)

    # -- state ---------------------------------------------------------------------------------------------

    async def status(self, kind: str, object_id: str) -> JobStatus:
        """``GET /status/{kind}/{id}`` (kind: audio, upscaled, mastered, stem_split, stem, workflow)."""
        response = await self.http.request("GET", f"/status/{kind}/{object_id}")
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("is_complete", False), bool):
            raise Malformed(f"{SERVICE} answered the status of {kind}/{object_id} with something that is not a status")
        return JobStatus(
            object_type=str(data.get("object_type") or kind),
            object_id=str(data.get("object_id") or object_id),
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
        # Names come from the network: one safe file name each, or "" for the caller to name.
        return [
            (str(s["stem_id"]), safe_component(str(s.get("name") or ""), ""))
            for s in stems
            if isinstance(s, dict) and "stem_id" in s
        ]

    # -- downloads -----------------------------------------------------------------------------------------

    async def request_archive(
        self,
        *,
        versions: Sequence[str],
        audio_id: str | None = None,
        ids: Sequence[str] | None = None,
        format: str = "wav",
        formats: Mapping[str, str] | None = None,
        stem_ids: Sequence[str] | None = None,
        stem_selections: Sequence[Mapping[str, Any]] | None = None,
    ) -> ArchiveOffer:
        """``POST /download-archive`` for one audio ID (``audio_id``) or several in one zip (``ids``).

        Track versions and stem versions are separate requests (ValueError if mixed). ``formats`` holds
        ``<version>_format`` overrides, passed through.
        """
        if (audio_id is None) == (ids is None):
            raise ValueError("give exactly one of audio_id and ids")
        tracks = [v for v in versions if v in TRACK_VERSIONS]
        if tracks and len(tracks) != len(versions):
            raise ValueError(f"track and stem versions must be separate archive requests: {list(versions)}")
        body: dict[str, Any] = {"versions": list(versions), "format": format, **(formats or {})}
        body.update({"id": audio_id} if audio_id is not None else {"ids": list(ids or [])})
        if stem_ids is not None:
            body["stem_ids"] = list(stem_ids)
        if stem_selections is not None:
            body["stem_selections"] = [dict(s) for s in stem_selections]
        try:
            response = await self.http.request("POST", "/download-archive", json=body)
        except Rejected as exc:
            if _not_ready(exc):  # asked a moment too early: transient for this file
                raise RetryLater(f"{exc} (the archive is not ready yet)", status=exc.status) from exc
            raise
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise Malformed(f"{SERVICE} answered /download-archive with something that is not JSON")
        known = {f for f in ArchiveOffer.__dataclass_fields__ if f != "extra"}
        return ArchiveOffer(
            download_url=data.get("download_url") or None,
            expires_in_seconds=data.get("expires_in_seconds"),
            email_notification_queued=bool(data.get("email_notification_queued")),
            email_notification_threshold_seconds=data.get("email_notification_threshold_seconds"),
            archive_incomplete=bool(data.get("archive_incomplete")),
            extra={k: v for k, v in data.items() if k not in known},
        )

    async def download_archive(self, url: str, dest: Path, *, max_bytes: int | None = None) -> int:
        """Stream a zip from its signed URL to ``dest`` (atomically); returns its size.

        ExpiredURL when storage refuses the URL (ask for a fresh archive); RetryLater when it arrives short;
        TooLarge when it announces or sends more than ``max_bytes``.
        """
        self._check_url(url, dest)
        return await self._from_storage(url, dest, max_bytes)

    async def download_object(
        self,
        kind: str,
        object_id: str,
        dest: Path,
        format: str = "wav",
        *,
        track: bool = False,
        fresh_urls: int = 2,
        max_bytes: int | None = None,
    ) -> int:
        """``GET /download/{kind}/{id}``: follow the 307 to storage without the key, stream to ``dest``.

        An expired signed URL is asked for again up to ``fresh_urls`` times before ExpiredURL is raised;
        more than ``max_bytes`` (announced or sent) is TooLarge. Returns the bytes written.
        """
        path = f"/download/{quote(kind, safe='')}/{quote(object_id, safe='')}"
        params = {"format": format, "track": "true" if track else "false"}
        for ask in range(fresh_urls + 1):
            location: str | None = None
            async for attempt in self.http.retrying():
                with attempt:
                    async with self.http.stream("GET", path, params=params) as response:
                        if response.status_code not in REDIRECTS:
                            if response.status_code == 200:  # served directly by the API: take it
                                return await _write_body(response, dest, SERVICE, max_bytes)
                            raise Malformed(f"{SERVICE} answered {response.status_code} to GET {path}, not a 307")
                        location = response.headers.get("Location")
                        if not location:
                            raise Malformed(f"{SERVICE} answered {response.status_code} without a Location")
                        location = str(response.url.join(location))
                        self._check_url(location, dest)
            assert location is not None
            try:
                return await self._from_storage(location, dest, max_bytes)
            except ExpiredURL:
                if ask == fresh_urls:
                    raise
                log.info("download.url_expired", path=display(dest), object=f"{kind}/{object_id}", next="asking again")
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_url(self, url: str, dest: Path) -> None:
        """RefusedRedirect unless ``url`` is https, or on the service's own scheme and host (a loopback emulator)."""
        parts = httpx.URL(url)
        base = self.http.client.base_url
        if parts.scheme == "https" or (parts.scheme, parts.host) == (base.scheme, base.host):
            return
        raise RefusedRedirect(
            f"the download of {display(dest.name)} was sent to {parts.scheme}://{parts.host}, which is neither "
            f"https nor the service's own host ({base.scheme}://{base.host}); not followed, this file is not delivered"
        )

    async def _from_storage(self, url: str, dest: Path, max_bytes: int | None = None) -> int:
        """GET ``url`` from storage with no credentials; 5xx and dropped transfers are retried here."""
        expired: ExpiredURL | None = None
        async for attempt in self.http.retrying():
            with attempt:
                try:
                    return await self._storage_once(url, dest, max_bytes)
                except ExpiredURL as exc:  # not retried here: the same URL will not work again
                    expired = exc
        assert expired is not None
        raise expired

    async def _storage_once(self, url: str, dest: Path, max_bytes: int | None = None) -> int:
        """One GET of a signed URL, following at most MAX_HOPS redirects by hand (each URL checked first)."""
        for _hop in range(MAX_HOPS + 1):
            self._check_url(url, dest)
            got = await self._storage_get(url, dest, max_bytes)
            if isinstance(got, int):
                return got
            url = got
        raise RefusedRedirect(
            f"{STORAGE} redirected the download of {display(dest.name)} more than {MAX_HOPS} times; "
            "not followed further, this file is not delivered"
        )

    async def _storage_get(self, url: str, dest: Path, max_bytes: int | None) -> int | str:
        """The bytes written, or the next URL when storage redirects."""
        try:
            async with self.storage.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response:
                status = response.status_code
                if status in REDIRECTS and response.headers.get("Location"):
                    return str(response.url.join(response.headers["Location"]))
                if status in (408, 425, 429) or status >= 500:
                    raise RetryLater(
                        f"{STORAGE} answered HTTP {status}",
                        retry_after=parse_retry_after(response.headers.get("Retry-After")),
                        status=status,
                    )
                if status >= 400:  # 403/404/410 (and S3's or GCS's 400): the signature is no good any more
                    raise ExpiredURL(f"{STORAGE} refused the signed URL (HTTP {status})", status=status)
                return await _write_body(response, dest, STORAGE, max_bytes)
        except (httpx.HTTPError, httpx.StreamError) as exc:
            raise translate_transport_error(exc, STORAGE) from exc


async def _write_body(response: httpx.Response, dest: Path, source: str, max_bytes: int | None = None) -> int:
    """Stream a response body to a temp file beside ``dest``, check its length, fsync, rename into place.

    A short body (Content-Length not met, or a dropped connection) is RetryLater; more than ``max_bytes``
    (announced by Content-Length, or counted while writing) is TooLarge. The temp file is removed either way.
    """
    expected = response.headers.get("Content-Length")  # counts the bytes on the wire (num_bytes_downloaded)
    if max_bytes is not None and expected is not None and expected.isdigit() and int(expected) > max_bytes:
        raise TooLarge(
            f"{source} announced {expected} bytes for {display(dest.name)}, more than the {max_bytes} bytes its "
            "source can justify; nothing was written, the file is not delivered"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{dest.name}")
    written = 0
    fh: IO[bytes] = await asyncio.to_thread(_open_private, tmp)
    try:
        try:
            async for chunk in response.aiter_bytes(CHUNK):
                written += len(chunk)
                if max_bytes is not None and written > max_bytes:
                    raise TooLarge(
                        f"{source} sent more than {max_bytes} bytes for {display(dest.name)}, more than its source "
                        "can justify; the partial file was removed, the file is not delivered"
                    )
                await asyncio.to_thread(fh.write, chunk)
            await asyncio.to_thread(_flush, fh)
        finally:
            fh.close()
        if expected is not None and expected.isdigit() and int(expected) != response.num_bytes_downloaded:
            raise RetryLater(f"{source} sent {response.num_bytes_downloaded} of {expected} bytes of {dest.name}")
        await asyncio.to_thread(_place, tmp, dest)
        served_as = disposition_name(response.headers.get("Content-Disposition"), "")
        log.debug("download.written", path=display(dest), bytes=written, served_as=served_as or None)
        return written
    except (httpx.HTTPError, httpx.StreamError) as exc:
        raise translate_transport_error(exc, source) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _not_ready(exc: Rejected) -> bool:
    """A refusal that says "not yet" (409, 425, or a 422 about versions not complete), not "never"."""
    text = str(exc).lower()
    return exc.status in (409, 425) or (
        exc.status == 422 and any(w in text for w in ("not complete", "not ready", "in progress"))
    )


def disposition_name(value: str | None, fallback: str) -> str:
    """The file name a ``Content-Disposition`` header suggests, as one safe name (for logs, never a path)."""
    if not value:
        return safe_component("", fallback)
    msg = Message()
    msg["Content-Disposition"] = value
    try:
        name = msg.get_filename() or ""
    except (ValueError, LookupError):
        name = ""
    return safe_component(str(name), fallback)


def _flush(fh: IO[bytes]) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _open_private(tmp: Path) -> IO[bytes]:
    """A new temp file only we can read (0600) until it is complete and renamed."""
    return os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE), "wb")


def _place(tmp: Path, dest: Path) -> None:
    """Rename the finished temp file into place with the output mode (the umask's)."""
    chmod_quietly(tmp, file_mode())
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
