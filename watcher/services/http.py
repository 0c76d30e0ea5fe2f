"""The one HTTP policy every client shares: the analysis and processing services, the storage host, webhooks.

Timeouts, an adaptive client-side rate limit (halved on a 429, recovered additively, see
:mod:`watcher.services.ratelimit`; no request before a ``Retry-After`` is over), a capped share of it for
status polls, a concurrency limit, retries with exponential backoff, jitter and
``Retry-After`` (through stamina: the only in-process retry layer, never around a request to a paid endpoint,
which is sent once on the gate's ticket: see :mod:`watcher.sending`), the translation of HTTP statuses and httpx
exceptions into the scopes of :mod:`watcher.errors` and redaction of URLs that carry tokens (both in
:mod:`watcher.services.httperrors`), and observation of
every request (for metrics) through httpx event hooks and an observer the composition root passes in.
Clients built on it know nothing of folders, pipelines or the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from watcher.errors import Deferred, NotSent, Rejected, RetryLater
from watcher.sending import spend_ticket
from watcher.services.httperrors import (
    NOT_PROCESSED,
    code_of,
    parse_retry_after,
    raise_for_status,
    translate_transport_error,
)
from watcher.services.ratelimit import AdaptiveRate, Bucket, PollShare

if TYPE_CHECKING:
    import ssl

    # httpx (with httpx-sse) is imported at the first request: a daemon with nothing to send
    import httpx  # starts without it (about a tenth of its start-up)

    from watcher.services.bandwidth import Bandwidth

log = structlog.get_logger("watcher.http")


class AudioSource(Protocol):
    """A file to send as a request body: its name, exact size, and a fresh chunk iterator per call."""

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    def chunks(self) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True)
class HttpPolicy:
    """How one service is called: limits, timeouts and the short in-process retry loop."""

    # The ceiling of the adaptive rate: a 429 halves the rate, each 429-free second adds rate_recovery back.
    rate_per_second: float = 5.0
    rate_recovery: float = 1.0
    # Status polls (``poll=True``) may use at most this fraction of the current rate; other requests use the rest.
    poll_share: float = 0.5
    concurrency: int = 2
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    attempts: int = 4
    wait_initial: float = 1.0
    wait_max: float = 30.0
    wait_jitter: float = 1.0
    # A Retry-After longer than this is not slept in-process: the store schedules the next attempt instead.
    max_inline_retry_after: float = 60.0
    retry_timeout: float = 600.0
    # Show only scheme://host/… of a URL in messages (webhook URLs often carry a token in their path).
    redact_urls: bool = False
    # The bandwidth limit every client of the graph shares (``bwlimit``); None: none.
    bandwidth: Bandwidth | None = None


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The certificate store httpx would load for each client (a tenth of a second of CPU), once per process."""
    import httpx

    return httpx.create_ssl_context()


# (service, method, seconds, code, bytes sent): code is "ok" or an error code. Must not raise.
RequestObserver = Callable[[str, str, float, str, int], None]
Classify = Callable[["httpx.Response"], None]
_STARTED = "watcher.started"


class ServiceHTTP:
    """An HTTP session to one service: base URL, auth headers, limits, retries and error translation."""

    def __init__(
        self,
        service: str,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        policy: HttpPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        observer: RequestObserver | None = None,
        paid_routes: Collection[tuple[str, str]] = (),
    ) -> None:
        self.service = service
        self.policy = policy or HttpPolicy()
        # (method, path) of every billed endpoint: sent only on a ticket from the gate, never retried here
        self.paid_routes = frozenset(paid_routes)
        self.observer = observer
        self._base_url = base_url.rstrip("/")
        self._headers = dict(headers or {})
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        p = self.policy
        ceiling = max(p.rate_per_second, 0.001)
        self._bucket = Bucket(ceiling)
        self.pace = AdaptiveRate(ceiling, floor=self._bucket.floor, recovery=p.rate_recovery)
        self._polls = PollShare(min(1.0, max(p.poll_share, 0.01)), ceiling)
        self._resume_at = 0.0  # monotonic: no request before this (the service's Retry-After)
        self._slots = asyncio.Semaphore(max(1, p.concurrency))

    @property
    def base_url(self) -> httpx.URL:
        """The service's base URL (parsed at the first use, with httpx; a bad one raises httpx.InvalidURL)."""
        import httpx

        return httpx.URL(self._base_url)

    @property
    def client(self) -> httpx.AsyncClient:
        """The session, made at its first use: making one loads the HTTP transport and the TLS certificates
        (a tenth of a second), which a daemon with nothing to send need not pay at start."""
        if self._client is None:
            import httpx

            p = self.policy
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=self._headers,
                timeout=httpx.Timeout(p.read_timeout, connect=p.connect_timeout),
                transport=self._metered(self._transport or httpx.AsyncHTTPTransport(verify=tls_context())),
                follow_redirects=False,  # redirects are followed by hand, each target checked
                event_hooks={"request": [self._on_request], "response": [self._on_response]},
            )
        return self._client

    def _metered(self, transport: httpx.AsyncBaseTransport) -> httpx.AsyncBaseTransport:
        """``transport`` under the shared bandwidth limit, when one is configured."""
        bandwidth = self.policy.bandwidth
        if bandwidth is None or bandwidth.is_off:
            return transport
        from watcher.services.bandwidth import throttled

        return throttled(transport, bandwidth)

    @property
    def rate(self) -> float:
        """Requests per second this service is sent now (the adaptive rate)."""
        return self.pace.current()

    def _throttled(self, response: httpx.Response, started: float) -> None:
        """A 429 (or 503) answer: honour its Retry-After for every request to this service; a 429 also halves
        the rate. Called for every such answer, whether the request is then retried in-process or not."""
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        now = time.monotonic()
        if retry_after:
            self._resume_at = max(self._resume_at, now + retry_after)
        if response.status_code == 429:
            before = self.pace.current(now)
            if self.pace.cut(started, resume_at=self._resume_at):
                log.warning(
                    "service.rate_cut",
                    service=self.service,
                    rate=round(before, 2),
                    now=round(self.pace.current(), 2),
                    retry_after=retry_after,
                    next=f"+{self.policy.rate_recovery:g}/s each second, up to {self.pace.ceiling:g}/s",
                )

    async def _honour_pause(self) -> None:
        """Wait out the service's Retry-After; a long one is not slept here: NotSent hands it to the store."""
        wait = self._resume_at - time.monotonic()
        if wait > self.policy.max_inline_retry_after:
            raise NotSent(f"{self.service} asked for no requests for another {wait:.0f} s", retry_after=wait)
        if wait > 0:
            await asyncio.sleep(wait)

    async def _poll_turn(self) -> None:
        """A status poll's turn within its share: now, or Deferred to its appointment (no attempt counted)."""
        wait = self._polls.admit(self.pace.current(), time.monotonic())
        if wait is not None:
            raise Deferred(
                f"{self.service}: status polls are at their share of the rate; next turn in {wait:.1f} s",
                until=time.time() + wait,
                code="waiting",
                routine=True,
            )
        await self._polls.bucket.take(self._polls.fraction * self.pace.current())

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _on_request(self, request: httpx.Request) -> None:
        request.extensions[_STARTED] = time.monotonic()

    async def _on_response(self, response: httpx.Response) -> None:
        """Every answer's status, time to headers and bytes sent, told to the observer (metrics)."""
        request = response.request
        code = code_of(response.status_code)
        sent = int(request.headers.get("Content-Length") or 0) if code == "ok" else 0
        self._observe(request.method, request.extensions.get(_STARTED), code, sent)

    def _observe(self, method: str, started: float | None, code: str, sent: int) -> None:
        if self.observer is None:
            return
        seconds = time.monotonic() - started if started is not None else 0.0
        with contextlib.suppress(Exception):
            self.observer(self.service, method, seconds, code, sent)

    def _backoff_hook(self, exc: BaseException) -> bool | float:
        """stamina hook: retry only RetryLater; honour a short Retry-After, hand long ones to the store."""
        if not isinstance(exc, RetryLater) or isinstance(exc, Deferred):
            return False
        if exc.retry_after is None:
            return True
        if exc.retry_after > self.policy.max_inline_retry_after:
            return False
        return exc.retry_after

    def is_paid(self, method: str, url: str) -> bool:
        """Whether a request goes to a billed endpoint (sent only on a ticket from the gate)."""
        return (method.upper(), url.partition("?")[0]) in self.paid_routes

    def retrying(self, *, attempts: int | None = None) -> Any:
        """A stamina retry context for a block that may raise RetryLater (each attempt a fresh block).

        Never around a paid request: the ticket of its first attempt is spent, so a second one is refused
        (NoTicket); a paid request is retried by a new take at the gate (see watcher.pipelines.paid).
        """
        import stamina  # here, not at the top: with tenacity it costs a start that may never send ~10 ms

        p = self.policy
        return stamina.retry_context(
            on=self._backoff_hook,
            attempts=attempts or p.attempts,
            timeout=p.retry_timeout,
            wait_initial=p.wait_initial,
            wait_max=p.wait_max,
            wait_jitter=p.wait_jitter,
        )

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        classify: Classify | None = None,
        poll: bool = False,
        probe: bool = False,
        covers: Collection[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[httpx.Response]:
        """One rate-limited attempt whose response body is read by the caller; errors are translated.

        A status of 400 or more is read and classified (``classify``, else :func:`raise_for_status`);
        a request that got no answer at all is reported to the observer here, with its error's code.
        ``poll``: a status poll, held to ``policy.poll_share`` of the rate (Deferred when its turn is later).
        A request to a paid endpoint spends the gate's ticket (``covers``: the operations it carries) as it is
        handed over, or is refused with NoTicket; ``probe`` marks the key check, which carries no paid work.
        """
        import httpx

        paid = not probe and self.is_paid(method, url)

        await self._honour_pause()
        if poll:
            await self._poll_turn()
        async with self._slots:
            await self._bucket.take(self.pace.current())
            await self._honour_pause()  # a 429 may have come in while this one waited
            started = time.monotonic()
            seen = False
            if paid:  # the spent ticket tells its paid call the request was handed over
                spend_ticket(f"{self.service} {method} {url}", covers)
            try:
                async with self.client.stream(method, url, **kwargs) as response:
                    seen = True
                    if response.status_code in NOT_PROCESSED:
                        self._throttled(response, started)
                    if response.status_code >= 400:
                        await response.aread()
                        if classify is not None:
                            classify(response)
                        raise_for_status(response, self.service, redact=self.policy.redact_urls)
                    yield response
            except (httpx.HTTPError, httpx.StreamError, httpx.InvalidURL) as exc:
                translated = translate_transport_error(exc, self.service)
                if not seen:
                    self._observe(method, started, translated.code, 0)
                raise translated from exc  # NotSent when it never connected

    async def probe(self, method: str, url: str, **kwargs: Any) -> str:
        """One request that proves the service is reachable and takes the key, whatever it answers otherwise.

        Raises NeedsUser for an account problem (401/402/403) and RetryLater when unreachable.
        """
        try:
            await self.request(method, url, retry=False, probe=True, **kwargs)
        except Rejected:
            return "reachable, key accepted (the test request itself was refused, as expected)"
        return "reachable, key accepted"

    async def request(self, method: str, url: str, *, retry: bool = True, **kwargs: Any) -> httpx.Response:
        """A whole request and response; retried on RetryLater unless ``retry`` is False or it is paid (one
        attempt on its ticket: a retry is the gate's new take)."""
        if not retry or (not kwargs.get("probe") and self.is_paid(method, url)):
            return await self._once(method, url, **kwargs)
        async for attempt in self.retrying():
            with attempt:
                return await self._once(method, url, **kwargs)
        raise AssertionError("unreachable: stamina re-raises the last error")  # pragma: no cover

    async def _once(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async with self.stream(method, url, **kwargs) as response:
            await response.aread()
            return response
