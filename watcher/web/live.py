"""The page's live feed: a subscriber of :mod:`watcher.events` that fans each event out to every open
``/api/events`` stream (server-sent events), as small JSON messages."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from watcher.events import Subscriber
from watcher.names import display
from watcher.store import State

if TYPE_CHECKING:
    from watcher.runner import Outcome

QUEUE_LIMIT = 1000  # a stream this far behind misses events (its page reloads its data on the next one)
KEEPALIVE_SECONDS = 15.0


class LiveEvents(Subscriber):
    """Events as messages for the page: ``settled``, ``step`` (a job moved on), ``done``, ``failed``,
    ``in_doubt``, ``spend`` (a paid call ended) and ``capped``. Thread-safe: events from another thread
    are handed to the loop that made this object."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queues: set[asyncio.Queue[dict[str, Any] | None]] = set()

    def publish(self, message: dict[str, Any]) -> None:
        message = {**message, "at": round(time.time(), 3)}
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._fan_out(message)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._fan_out, message)

    def _fan_out(self, message: dict[str, Any] | None) -> None:
        for queue in list(self.queues):
            if queue.full():
                continue
            queue.put_nowait(message)

    def close(self) -> None:
        """End every open stream (the server is stopping)."""
        self._fan_out(None)

    async def stream(self) -> AsyncIterator[str]:
        """One client's server-sent events, with a comment now and then to keep proxies from closing it."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE_LIMIT)
        self.queues.add(queue)
        try:
            yield ": connected\n\n"
            while True:
                try:
                    message = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if message is None:
                    return
                yield f"event: {message['type']}\ndata: {json.dumps(message)}\n\n"
        finally:
            self.queues.discard(queue)

    # -- the events --------------------------------------------------------------------------------

    def file_settled(self, folder: str, path: str) -> None:
        self.publish({"type": "settled", "folder": display(folder), "path": display(path)})

    def outcome(self, outcome: Outcome) -> None:
        job = outcome.job
        kind = outcome.state if outcome.state in (State.DONE, State.FAILED, State.IN_DOUBT) else "step"
        self.publish(
            {
                "type": kind,
                "path": display(job.file.path),
                "pipeline": job.pipeline,
                "state": outcome.state,
                "step": job.step,
                "error": outcome.error if outcome.state in (State.FAILED, State.IN_DOUBT) else None,
            }
        )

    def paid(self, budget: str, operation: str, ending: str, seconds: float) -> None:
        self.publish(
            {
                "type": "spend",
                "budget": budget,
                "operation": operation,
                "ending": ending,
                "service": budget,  # deprecated names of budget and ending, until 0.4.0
                "outcome": ending,
                "seconds": round(seconds, 1),
            }
        )

    def capped(self, budget: str, spent_seconds: float, cap_seconds: float, until: float) -> None:
        self.publish(
            {
                "type": "capped",
                "budget": budget,
                "service": budget,  # deprecated: the same as budget, until 0.4.0
                "minutes_today": round(spent_seconds / 60, 2),
                "cap_minutes": round(cap_seconds / 60, 2),
                "until": round(until),
            }
        )
