"""Optional webhooks: a JSON POST to each configured URL when a file's job is done or has failed.

Sending never blocks and never raises into the daemon: events go into a bounded queue drained by one
task (a full queue drops its oldest event with a warning). Each POST goes through the same HTTP policy as
every other client (watcher.services.http): retried with backoff on a connection error, 408, 425, 429
(honouring a short ``Retry-After``) or 5xx; other 4xx answers are not retried.

The body is the caller's payload under an envelope::

    {"event": "file.done", "id": "<hex, the same on every retry>", "timestamp": "2026-01-02T03:04:05.678Z",
     "watcher_version": "0.2.0", "host": "<hostname>",
     "path": "/srv/audio/inbox/a.wav", "pipeline": "analyze", "error": null, "sidecar": "...", ...}

Headers: ``X-Watcher-Event``, ``X-Watcher-Delivery`` (the id) and, with a secret, ``X-Watcher-Signature:
sha256=<hex HMAC-SHA256 of the exact body bytes>``. The secret is never logged, nor are URLs beyond their
scheme and host (webhook URLs often carry a token in their path).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import socket
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from watcher import __version__
from watcher.errors import RetryLater, WatcherError
from watcher.services.http import HttpPolicy, RequestObserver, ServiceHTTP
from watcher.services.httperrors import safe_url

log = structlog.get_logger("watcher.webhooks")
EVENTS = ("file.done", "file.failed")
QUEUE_SIZE = 1000
ENVELOPE = ("event", "id", "timestamp", "watcher_version", "host")


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Watcher-Signature`` value for ``body``: a receiver recomputes it with the shared secret."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def envelope(event: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The body sent for ``event``: envelope fields first, then the payload's (which cannot override them)."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    body: dict[str, Any] = {
        "event": event,
        "id": uuid.uuid4().hex,
        "timestamp": now,
        "watcher_version": __version__,
        "host": socket.gethostname(),
    }
    body.update((k, v) for k, v in payload.items() if k not in ENVELOPE)
    return body


class WebhookSender:
    """Posts events to URLs in the background: ``start()`` in the event loop, ``send()``, then ``aclose()``."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        secret: str | None = None,
        timeout: float = 10.0,
        attempts: int = 5,
        wait_initial: float = 1.0,
        wait_max: float = 30.0,
        wait_jitter: float = 1.0,
        retry_timeout: float = 120.0,
        queue_size: int = QUEUE_SIZE,
        observer: RequestObserver | None = None,
    ) -> None:
        self.urls = list(urls)
        self._secret = secret.encode() if secret else None
        self._policy = HttpPolicy(
            rate_per_second=50.0,
            concurrency=4,
            connect_timeout=min(timeout, 10.0),
            read_timeout=timeout,
            attempts=attempts,
            wait_initial=wait_initial,
            wait_max=wait_max,
            wait_jitter=wait_jitter,
            max_inline_retry_after=wait_max,
            retry_timeout=retry_timeout,
            redact_urls=True,
        )
        self._observer = observer
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(max(1, queue_size))
        self._task: asyncio.Task[None] | None = None
        self._http: ServiceHTTP | None = None
        self._busy = False
        self.delivered = 0  # (event, URL) pairs accepted by the receiver
        self.failed = 0  # (event, URL) pairs given up on
        self.dropped = 0  # events pushed out of a full queue, or left unsent at close

    def __repr__(self) -> str:
        return f"WebhookSender(urls={[safe_url(u) for u in self.urls]}, signed={self._secret is not None})"

    def start(self) -> None:
        """Start the worker task (call from inside the running event loop)."""
        if self._task is not None:
            return
        self._http = ServiceHTTP(
            "webhook receiver",
            "",
            headers={"User-Agent": f"watcher/{__version__}"},
            policy=self._policy,
            observer=self._observer,
        )
        self._task = asyncio.create_task(self._drain(), name="webhooks")

    async def send(self, event: str, payload: Mapping[str, Any]) -> None:
        """Queue ``event`` for every URL; returns at once, never raises."""
        self.send_nowait(event, payload)

    def send_nowait(self, event: str, payload: Mapping[str, Any]) -> None:
        """The same as :meth:`send`, for synchronous callers such as event subscribers (in the loop's thread)."""
        try:
            body = envelope(event, payload)
        except Exception as exc:  # a caller's bad payload must not reach the daemon as an exception
            log.error("webhook.bad_payload", hook_event=event, error=repr(exc))
            return
        if self._queue.full():
            old = self._queue.get_nowait()
            self._queue.task_done()
            self.dropped += 1
            log.warning(
                "webhook.dropped",
                path=old.get("path"),
                hook_event=old.get("event"),
                reason=f"{self._queue.maxsize} events are waiting (is the receiver down?)",
            )
        self._queue.put_nowait(body)

    async def _drain(self) -> None:
        while True:
            body = await self._queue.get()
            self._busy = True
            try:
                await asyncio.gather(*(self._post(url, body) for url in self.urls))
            except Exception as exc:  # never let the worker die: later events still go out
                log.error("webhook.error", path=body.get("path"), error=repr(exc))
            finally:
                self._busy = False
                self._queue.task_done()

    async def _post(self, url: str, body: dict[str, Any]) -> None:
        data = json.dumps(body, default=str).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Watcher-Event": str(body["event"]),
            "X-Watcher-Delivery": str(body["id"]),
        }
        if self._secret:
            headers["X-Watcher-Signature"] = sign(self._secret, data)
        assert self._http is not None
        where = safe_url(url)
        try:
            await self._http.request("POST", url, content=data, headers=headers)
        except WatcherError as exc:
            self.failed += 1
            status = getattr(exc, "status", None)
            refused = status is not None and not isinstance(exc, RetryLater)
            log.warning(
                "webhook.refused" if refused else "webhook.failed",
                path=body.get("path"),
                hook_event=body["event"],
                url=where,
                status=status,
                error=str(exc),
                next="not retried: check the receiver's URL and what it expects"
                if refused
                else "this event is not sent to this URL; later events still are",
            )
            return
        self.delivered += 1
        log.debug("webhook.delivered", path=body.get("path"), hook_event=body["event"], url=where)

    async def aclose(self, deadline: float = 3.0) -> int:
        """Send what is queued for up to ``deadline`` seconds, then stop; returns how many events were left unsent."""
        interrupted = False
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), deadline)
            interrupted = self._busy
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        unsent = self._queue.qsize() + int(interrupted)
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
        if unsent:
            self.dropped += unsent
            log.warning("webhook.unsent", events=unsent, reason=f"not delivered within {deadline:g} s of stopping")
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        return unsent
