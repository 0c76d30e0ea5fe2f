"""The shared HTTP policy: statuses and foreign exceptions become our three error classes."""

from __future__ import annotations

import asyncio
import datetime as dt

import httpx
import pytest
from httpx_sse import SSEError

from watcher.errors import Malformed, NeedsUser, NotSent, Rejected, RetryLater
from watcher.services.http import ServiceHTTP
from watcher.services.httperrors import parse_retry_after, raise_for_status, translate_transport_error


def response(status: int, body: object = None, headers: dict | None = None) -> httpx.Response:
    request = httpx.Request("POST", "https://service.invalid/v1/x")
    return httpx.Response(
        status, json=body if body is not None else {"detail": "why"}, headers=headers, request=request
    )


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (408, RetryLater),
        (429, NotSent),
        (500, RetryLater),
        (503, NotSent),
        (401, NeedsUser),
        (402, NeedsUser),
        (403, NeedsUser),
        (400, Rejected),
        (404, Rejected),
        (409, Rejected),
        (422, Rejected),
        (413, Rejected),
        (415, Rejected),
    ],
)
def test_status_classes(status, error):
    """Each status maps to exactly one class of one scope, and the message carries the detail."""
    with pytest.raises(error) as err:
        raise_for_status(response(status), "svc")
    assert type(err.value) is error
    assert f"HTTP {status}" in str(err.value) and "why" in str(err.value)


def test_success_and_redirect_pass():
    """2xx and 3xx are not errors."""
    raise_for_status(response(200), "svc")
    raise_for_status(response(307), "svc")


def test_retry_after_forms():
    """Retry-After in seconds or as an HTTP date; garbage is ignored."""
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    with pytest.raises(RetryLater) as err:
        raise_for_status(response(429, headers={"Retry-After": "3"}), "svc")
    assert err.value.retry_after == 3.0


REQ = httpx.Request("GET", "https://service.invalid/")


@pytest.mark.parametrize(
    ("exc", "error", "phrase"),
    [
        (httpx.ConnectError("refused", request=REQ), NotSent, "could not be reached: ConnectError"),
        (httpx.ConnectTimeout("slow", request=REQ), NotSent, "could not be reached: ConnectTimeout"),
        (httpx.PoolTimeout("busy", request=REQ), NotSent, "could not be reached: PoolTimeout"),
        (httpx.ReadTimeout("slow", request=REQ), RetryLater, "timed out (ReadTimeout)"),
        (httpx.WriteTimeout("slow", request=REQ), RetryLater, "timed out (WriteTimeout)"),
        (httpx.ReadError("reset", request=REQ), RetryLater, "could not be reached: ReadError"),
        (httpx.WriteError("reset", request=REQ), RetryLater, "could not be reached: WriteError"),
        (httpx.RemoteProtocolError("eof", request=REQ), RetryLater, "could not be reached: RemoteProtocolError"),
        (httpx.LocalProtocolError("bad", request=REQ), RetryLater, "could not be reached: LocalProtocolError"),
        (httpx.ProxyError("proxy", request=REQ), RetryLater, "could not be reached: ProxyError"),
        (httpx.UnsupportedProtocol("ftp", request=REQ), NeedsUser, "URL is not usable"),
        (httpx.InvalidURL("bad url"), NeedsUser, "URL is not usable"),
        (httpx.HTTPStatusError("x", request=REQ, response=response(401)), NeedsUser, "API key was refused"),
        (httpx.HTTPStatusError("x", request=REQ, response=response(422)), Rejected, "HTTP 422"),
        (httpx.StreamConsumed(), RetryLater, "stream failed: StreamConsumed"),
        (SSEError("not sse"), Malformed, "malformed event stream"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else getattr(v, "__name__", str(v)),
)
def test_every_foreign_exception_maps(exc, error, phrase):
    """Every httpx and httpx-sse exception becomes exactly one of ours, by the branch that names its cause."""
    ours = translate_transport_error(exc, "svc")
    assert type(ours) is error
    assert phrase in str(ours)


def test_client_translates_at_the_edge():
    """A request through ServiceHTTP raises ours, with the httpx exception as its cause."""

    def fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async def go() -> None:
        http = ServiceHTTP("svc", "https://service.invalid", transport=httpx.MockTransport(fail))
        try:
            await http.request("GET", "/x", retry=False)
        finally:
            await http.aclose()

    with pytest.raises(RetryLater) as err:
        asyncio.run(go())
    assert isinstance(err.value.__cause__, httpx.ConnectError)
