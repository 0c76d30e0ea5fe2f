"""The storage host that signed download URLs point to: a session with no credentials at all, under the same
HTTP policy as the services, that follows redirects by hand (https, or the service's own host; at most 5 hops)
and writes what it gets to disk atomically, bounded by what the source can justify."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from email.message import Message
from pathlib import Path
from typing import IO, TYPE_CHECKING

import structlog

from watcher.errors import BadInput, ExpiredURL, RetryLater
from watcher.fsutil import PRIVATE_FILE, chmod_quietly, file_mode, fsync_dir, safe_component, temp_prefix
from watcher.names import display
from watcher.safezip import TooLarge
from watcher.services.http import HttpPolicy, RequestObserver, ServiceHTTP
from watcher.services.httperrors import translate_transport_error

if TYPE_CHECKING:  # imported at the first download (see watcher.services.http)
    import httpx

log = structlog.get_logger("watcher.storage")
STORAGE = "storage host"
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 1 << 20
MAX_HOPS = 5


class RefusedRedirect(BadInput):
    """A download was sent somewhere it must not go (not https, not the service's host, too many hops)."""

    kind = "bad_input"


class Storage:
    """Downloads from signed URLs; ``home`` is the service's base URL (redirects there are allowed)."""

    def __init__(
        self,
        home: str,
        policy: HttpPolicy,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        observer: RequestObserver | None = None,
    ) -> None:
        self.home = home
        self.http = ServiceHTTP(STORAGE, "", policy=policy, transport=transport, observer=observer)

    async def aclose(self) -> None:
        await self.http.aclose()

    def check(self, url: str, dest: Path) -> None:
        """RefusedRedirect unless ``url`` is https, or on the service's own scheme and host (a loopback emulator)."""
        import httpx

        parts = httpx.URL(url)
        base = httpx.URL(self.home)
        if parts.scheme == "https" or (parts.scheme, parts.host) == (base.scheme, base.host):
            return
        raise RefusedRedirect(
            f"the download of {display(dest.name)} was sent to {parts.scheme}://{parts.host}, which is neither "
            f"https nor the service's own host ({base.scheme}://{base.host}); not followed, this file is not delivered"
        )

    async def fetch(self, url: str, dest: Path, max_bytes: int | None = None) -> int:
        """GET ``url`` with no credentials into ``dest``; 5xx and dropped transfers are retried here."""
        expired: ExpiredURL | None = None
        async for attempt in self.http.retrying():
            with attempt:
                try:
                    return await self._once(url, dest, max_bytes)
                except ExpiredURL as exc:  # not retried here: the same URL will not work again
                    expired = exc
        assert expired is not None
        raise expired

    async def _once(self, url: str, dest: Path, max_bytes: int | None = None) -> int:
        """One GET of a signed URL, following at most MAX_HOPS redirects by hand (each URL checked first)."""
        for _hop in range(MAX_HOPS + 1):
            self.check(url, dest)
            got = await self._get(url, dest, max_bytes)
            if isinstance(got, int):
                return got
            url = got
        raise RefusedRedirect(
            f"{STORAGE} redirected the download of {display(dest.name)} more than {MAX_HOPS} times; "
            "not followed further, this file is not delivered"
        )

    async def _get(self, url: str, dest: Path, max_bytes: int | None) -> int | str:
        """The bytes written, or the next URL when storage redirects."""
        headers = {"Accept-Encoding": "identity"}
        async with self.http.stream("GET", url, classify=_expired, headers=headers) as response:
            if response.status_code in REDIRECTS and response.headers.get("Location"):
                return str(response.url.join(response.headers["Location"]))
            return await write_body(response, dest, STORAGE, max_bytes)


async def write_body(response: httpx.Response, dest: Path, source: str, max_bytes: int | None = None) -> int:
    """Stream a response body to a temp file beside ``dest``, check its length, fsync, rename into place.

    A short body (Content-Length not met, or a dropped connection) is RetryLater; more than ``max_bytes``
    (announced by Content-Length, or counted while writing) is TooLarge. The temp file is removed either way.
    """
    import httpx

    expected = response.headers.get("Content-Length")  # counts the bytes on the wire (num_bytes_downloaded)
    if max_bytes is not None and expected is not None and expected.isdigit() and int(expected) > max_bytes:
        raise TooLarge(
            f"{source} announced {expected} bytes for {display(dest.name)}, more than the {max_bytes} bytes its "
            "source can justify; nothing was written, the file is not delivered"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{temp_prefix()}{uuid.uuid4().hex[:8]}-{dest.name}")
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


def _expired(response: httpx.Response) -> None:
    """Storage's refusals: 403/404/410 (and S3's or GCS's 400) mean the signature is no good any more."""
    status = response.status_code
    if 400 <= status < 500 and status not in (408, 425, 429):
        raise ExpiredURL(f"{STORAGE} refused the signed URL (HTTP {status})", status=status)


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
