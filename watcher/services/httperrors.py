"""HTTP answers and httpx errors as the errors of :mod:`watcher.errors` (their scope: this file, the service, or a
transient one), ``Retry-After`` read, and URLs redacted for the log; used by the shared HTTP policy
(:mod:`watcher.services.http`) and its clients."""

from __future__ import annotations

import datetime as dt
import email.utils
from typing import TYPE_CHECKING, Any

from watcher.errors import Malformed, NeedsUser, NotSent, Rejected, RetryLater, WatcherError

if TYPE_CHECKING:
    import httpx  # imported at the first request (see watcher.services.http)


def safe_url(url: str | httpx.URL) -> str:
    """A URL as it may be logged: scheme, host and port only."""
    import httpx

    parts = httpx.URL(str(url))
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.host or '?'}{port}/…"


def parse_retry_after(value: str | None, *, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - now).total_seconds())


def _detail(response: httpx.Response) -> str:
    """A short, printable reason from an error response body (FastAPI's ``detail`` when present)."""
    try:
        body: Any = response.json()
    except ValueError:
        text = response.text.strip() if not response.is_stream_consumed or response.content else ""
        return text[:200]
    if isinstance(body, dict):
        for key in ("detail", "error", "message"):
            if key in body:
                return str(body[key])[:300]
    return str(body)[:200]


# Answers that prove the request was not processed: safe to resend, even a paid one (RFC 9110: 429 asks the
# client to slow down; 503 says the server is unable to handle the request now).
NOT_PROCESSED = (429, 503)


def raise_for_status(response: httpx.Response, service: str, *, redact: bool = False) -> None:
    """Translate a non-success status into an error of the right scope; return on 2xx and 3xx.

    transient: 408, 425, 429, 5xx (429 and 503 as NotSent: nothing was done); service: 401, 402, 403 (the account);
    this file: every other 4xx (400, 404, 409, 413, 415, 422, ...), with the service's own message.
    The body must already be read (``await response.aread()`` for streams) for the detail to show.
    """
    status = response.status_code
    if status < 400:
        return
    detail = _detail(response)
    where = safe_url(response.request.url) if redact else response.request.url.path
    what = f"{service} answered HTTP {status} to {response.request.method} {where}"
    if detail:
        what += f": {detail}"
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    if status in NOT_PROCESSED:
        raise NotSent(what, retry_after=retry_after, status=status)
    if status in (408, 425) or status >= 500:
        raise RetryLater(what, retry_after=retry_after, status=status)
    if status == 401:
        raise NeedsUser(f"{what} (the API key was refused: check it)", status=status)
    if status == 402:
        raise NeedsUser(f"{what} (the account is out of credits)", status=status)
    if status == 403:
        raise NeedsUser(f"{what} (the account may not do this: check the key and the plan)", status=status)
    raise Rejected(what, status=status)


def translate_transport_error(exc: Exception, service: str) -> WatcherError:
    """Map an httpx (or httpx-sse) exception to one of ours; unknown ones are treated as transient."""
    if isinstance(exc, WatcherError):
        return exc
    import httpx
    from httpx_sse import SSEError

    if isinstance(exc, SSEError):
        return Malformed(f"{service} sent a malformed event stream: {exc}")
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return NotSent(f"{service} could not be reached: {type(exc).__name__}: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        return RetryLater(f"{service} timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return NeedsUser(f"{service} URL is not usable: {exc}")
    if isinstance(exc, httpx.TransportError):
        return RetryLater(f"{service} could not be reached: {type(exc).__name__}: {exc}")
    if isinstance(exc, httpx.HTTPStatusError):
        try:
            raise_for_status(exc.response, service)
        except WatcherError as ours:
            return ours
    if isinstance(exc, httpx.StreamError):
        return RetryLater(f"{service} stream failed: {type(exc).__name__}")
    return RetryLater(f"{service} request failed: {type(exc).__name__}: {exc}")


def code_of(status: int) -> str:
    """The error code a status maps to, for the observer (the same classes raise_for_status raises)."""
    if status < 400:
        return "ok"
    if status in NOT_PROCESSED or status in (408, 425) or status >= 500:
        return RetryLater.code
    return NeedsUser.code if status in (401, 402, 403) else Rejected.code
