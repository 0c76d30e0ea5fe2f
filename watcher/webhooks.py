"""Optional webhooks: a JSON POST to each configured URL when a file's job is done or failed.

Sending never blocks the daemon: events go into a bounded queue drained by one task, each POST is
retried with backoff, and a full queue drops its oldest event with a warning. With a secret, each body
is signed (``X-Watcher-Signature: sha256=<hex HMAC>``); the secret is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any

import httpx
import stamina
import structlog

from watcher import __version__

log = structlog.get_logger("watcher.webhooks")
QUEUE_SIZE = 1000


class WebhookSender:
    """Posts events to URLs in the background; ``send`` only enqueues."""

    def __init__(
        self, urls: Sequence[str], *, secret: str | None = None, timeout: float = 10.0, attempts: int = 5
    ) -> None:
        self.urls = list(urls)
        self._secret = secret.encode() if secret else None
        self._timeout = timeout
        self._attempts = attempts
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self.delivered = 0

    def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        self._task = asyncio.create_task(self._drain(), name="webhooks")

    def send(self, event: str, payload: dict[str, Any]) -> None:
        """Queue an event (``file.done`` or ``file.failed``) for every URL."""
        body = {
            "event": event,
            "at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
            "watcher_version": __version__,
            **payload,
        }
        if self._queue.full():
            dropped = self._queue.get_nowait()
            log.warning(
                "webhook.dropped",
                path=dropped.get("path"),
                event=dropped.get("event"),
                reason="the queue is full (receiver down for long?)",
            )
        self._queue.put_nowait(body)

    async def _drain(self) -> None:
        while True:
            body = await self._queue.get()
            for url in self.urls:
                await self._post(url, body)
            self._queue.task_done()

    async def _post(self, url: str, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "User-Agent": f"watcher/{__version__}"}
        if self._secret:
            headers["X-Watcher-Signature"] = "sha256=" + hmac.new(self._secret, data, hashlib.sha256).hexdigest()
        assert self._client is not None
        try:
            async for attempt in stamina.retry_context(
                on=httpx.HTTPError, attempts=self._attempts, wait_initial=0.2, wait_max=30, timeout=120
            ):
                with attempt:
                    response = await self._client.post(url, content=data, headers=headers)
                    if response.status_code >= 500 or response.status_code == 429:
                        response.raise_for_status()
            if response.status_code >= 400:
                log.warning("webhook.refused", url=url, status=response.status_code, path=body.get("path"))
            else:
                self.delivered += 1
        except httpx.HTTPError as exc:
            log.warning(
                "webhook.failed",
                url=url,
                error=type(exc).__name__,
                path=body.get("path"),
                next="this event is dropped; later events are still sent",
            )

    async def aclose(self, deadline: float = 3.0) -> None:
        """Flush what is queued for up to ``deadline`` seconds, then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), deadline)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._client is not None:
            await self._client.aclose()
