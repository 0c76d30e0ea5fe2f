"""Client of the processing and archive service (Neural Analog): upload, process, poll, download.

Every API call carries ``X-API-Key``. Downloads follow the API's 307 by hand with a second HTTP client
that has no default headers at all, so the key can never reach the storage host.

Paid calls (upload, restore, master, stems) are one request each, on the gate's ticket, never sent again
here: NotSent says the service provably did no work (the connection was never made, the upload's body was
not yet sent in full when it failed, a 429 or 503), RetryLater (a 5xx, a timeout, a dropped connection after
the whole request was sent) and Malformed (a 2xx without the new object's ID, a 3xx) that it may have; the
caller's gate decides what comes next. Reads (status, archive offers, downloads) are retried on any RetryLater.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import structlog

from watcher.errors import ExpiredURL, Malformed, NotSent, Rejected, RetryLater
from watcher.fsutil import safe_component
from watcher.names import display
from watcher.services.http import (
    AudioSource,
    HttpPolicy,
    RequestObserver,
    ServiceHTTP,
)
from watcher.services.multipart import MultipartBody
from watcher.services.storage import REDIRECTS, RefusedRedirect, Storage, write_body
from watcher.versions import TRACK_VERSIONS

if TYPE_CHECKING:  # imported at the first request (see watcher.services.http)
    import httpx

__all__ = ["ArchiveOffer", "AudioSource", "ExpiredURL", "JobStatus", "NeuralAnalogClient", "RefusedRedirect"]

log = structlog.get_logger("watcher.processing")
SERVICE = "processing service"
# The billed endpoints: each request to one of these needs the gate's ticket (watcher.sending).
PAID_PATHS = ("/from-file", "/from-link", "/upscale-audio", "/master-audio", "/create-stems", "/run-workflow")
PAID_ROUTES = frozenset(("POST", p) for p in PAID_PATHS)


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
        observer: RequestObserver | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = ServiceHTTP(
            SERVICE,
            base_url,
            headers=headers,
            policy=policy,
            transport=transport,
            observer=observer,
            paid_routes=PAID_ROUTES,
        )
        # Storage gets a session of its own with no default headers, so no credential can leak there, under
        # the same policy (limits, timeouts, metrics; signed URLs can be long-lived tokens: never logged whole).
        # Its redirects are followed by hand, each target checked (https, or the service's own host).
        p = self.http.policy
        storage = replace(p, redact_urls=True, rate_per_second=max(p.rate_per_second, 50.0))
        self.storage = Storage(base_url.rstrip("/"), storage, transport=storage_transport, observer=observer)

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

        Sent once, on the gate's ticket; a connection lost before the body was sent in full is NotSent.
        """
        body = MultipartBody("audio", source, {"file_source": "from_file"})
        try:
            response = await self.http.request("POST", "/from-file", content=body, headers=body.headers)
        except RetryLater as exc:
            if exc.status is None and not isinstance(exc, NotSent) and not body.complete:
                raise NotSent(
                    f"{SERVICE}: the connection failed after {body.sent} of {source.size} bytes of the "
                    f"upload ({exc}); a partial body cannot have been accepted"
                ) from exc
            raise
        return self._id(response, "audio_id")

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
        response = await self.http.request("POST", path, json=dict(body))
        return self._id(response, id_field)

    @staticmethod
    def _id(response: httpx.Response, id_field: str) -> str:
        """The new object's ID. An answer without one (a 2xx without it, a 3xx, a body that is not JSON) is
        Malformed: the whole request was sent, so the work may be done and billed: the gate holds it in doubt."""
        try:
            value = response.json().get(id_field) if response.status_code < 300 else None
        except (ValueError, AttributeError):
            value = None
        if not value or not isinstance(value, str | int):
            raise Malformed(
                f"{SERVICE} answered {response.status_code} to {response.request.url.path} without {id_field!r}: "
                f"{response.text[:200]!r}; the work may have been done"
            )
        return str(value)

    # -- state ---------------------------------------------------------------------------------------------

    async def status(self, kind: str, object_id: str) -> JobStatus:
        """``GET /status/{kind}/{id}`` (kind: audio, upscaled, mastered, stem_split, stem, workflow)."""
        return await self._status(kind, object_id, poll=False)

    async def poll(self, kind: str, object_id: str) -> JobStatus:
        """:meth:`status` as a progress poll: held to the policy's poll share of the rate, so new work (uploads,
        version and archive requests) keeps the rest; Deferred (no attempt counted) when its turn is later."""
        return await self._status(kind, object_id, poll=True)

    async def _status(self, kind: str, object_id: str, *, poll: bool) -> JobStatus:
        response = await self.http.request("GET", f"/status/{kind}/{object_id}", poll=poll)
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
        self.storage.check(url, dest)
        return await self.storage.fetch(url, dest, max_bytes)

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
                                return await write_body(response, dest, SERVICE, max_bytes)
                            raise Malformed(f"{SERVICE} answered {response.status_code} to GET {path}, not a 307")
                        location = response.headers.get("Location")
                        if not location:
                            raise Malformed(f"{SERVICE} answered {response.status_code} without a Location")
                        location = str(response.url.join(location))
                        self.storage.check(location, dest)
            assert location is not None
            try:
                return await self.storage.fetch(location, dest, max_bytes)
            except ExpiredURL:
                if ask == fresh_urls:
                    raise
                log.info("download.url_expired", path=display(dest), object=f"{kind}/{object_id}", next="asking again")
        raise AssertionError("unreachable")  # pragma: no cover

def _not_ready(exc: Rejected) -> bool:
    """A refusal that says "not yet" (409, 425, or a 422 about versions not complete), not "never"."""
    text = str(exc).lower()
    return exc.status in (409, 425) or (
        exc.status == 422 and any(w in text for w in ("not complete", "not ready", "in progress"))
    )


