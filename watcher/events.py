"""What happens, told to whoever listens: files settling, jobs moving on, paid calls, caps reached.

The daemon chooses the subscribers (metrics, webhooks, the page's live feed in web/live.py, its own change
watch) and the composition root puts them behind one :class:`Events` fan-out; pipelines, the runner and
detection only ever call it. A subscriber that raises is
logged and never stops the others, nor the work that reported the event.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from watcher.names import display
from watcher.store import State

if TYPE_CHECKING:
    from watcher.metrics import NullMetrics
    from watcher.runner import Outcome
    from watcher.webhooks import WebhookSender

log = structlog.get_logger("watcher.events")


def iso(timestamp: float | None) -> str | None:
    """A Unix time as ISO 8601 UTC to the second (``2026-11-29T23:04:05Z``), or None."""
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Subscriber:
    """Every event, doing nothing: subclasses override what they care about."""

    def file_settled(self, folder: str, path: str) -> None:
        """A new revision settled in ``folder`` and was recorded."""

    def outcome(self, outcome: Outcome) -> None:
        """A job ran: its new state (pending, in_doubt, or a final one), and its error if any."""

    def paid(self, budget: str, operation: str, ending: str, seconds: float) -> None:
        """A paid request ended (``ending``: answered, not_sent, in_doubt, partial), covering ``seconds`` of audio."""

    def capped(self, budget: str, spent_seconds: float, cap_seconds: float, until: float) -> None:
        """A paid call was not sent because ``budget``'s daily cap would be passed (first time that day)."""


class Events(Subscriber):
    """The fan-out: every event goes to every subscriber, in order; a failing one is logged and skipped."""

    def __init__(self, subscribers: Iterable[Subscriber] = ()) -> None:
        self.subscribers = list(subscribers)

    def _each(self, method: str, *args: Any) -> None:
        for sub in self.subscribers:
            try:
                getattr(sub, method)(*args)
            except Exception:
                log.exception("events.subscriber_failed", subscriber=type(sub).__name__, event=method)

    def file_settled(self, folder: str, path: str) -> None:
        self._each("file_settled", folder, path)

    def outcome(self, outcome: Outcome) -> None:
        self._each("outcome", outcome)

    def paid(self, budget: str, operation: str, ending: str, seconds: float) -> None:
        self._each("paid", budget, operation, ending, seconds)

    def capped(self, budget: str, spent_seconds: float, cap_seconds: float, until: float) -> None:
        log.warning(
            "spend.capped",
            budget=budget,
            service=budget,  # deprecated: the same as budget, until 0.4.0
            minutes_today=round(spent_seconds / 60, 2),
            cap_minutes=round(cap_seconds / 60, 2),
            next=f"no paid {budget} call is sent until {iso(until)}; files wait, nothing is lost",
        )
        self._each("capped", budget, spent_seconds, cap_seconds, until)


class MetricsEvents(Subscriber):
    """Events as Prometheus counters."""

    def __init__(self, metrics: NullMetrics) -> None:
        self.metrics = metrics

    def file_settled(self, folder: str, path: str) -> None:
        self.metrics.file_seen(folder)

    def outcome(self, outcome: Outcome) -> None:
        self.metrics.outcome(outcome.job.pipeline, outcome.state)

    def paid(self, budget: str, operation: str, ending: str, seconds: float) -> None:
        self.metrics.paid_call(budget, operation, ending, seconds)


class WebhookEvents(Subscriber):
    """Events as webhooks: ``file.done``, ``file.failed``, ``file.in_doubt`` and ``spend.capped``."""

    STATES: ClassVar[dict[State, str]] = {
        State.DONE: "file.done",
        State.FAILED: "file.failed",
        State.IN_DOUBT: "file.in_doubt",
    }

    def __init__(self, sender: WebhookSender, wanted: Iterable[str]) -> None:
        self.sender = sender
        self.wanted = set(wanted)

    def outcome(self, outcome: Outcome) -> None:
        event = self.STATES.get(outcome.state)
        if event not in self.wanted:
            return
        job = outcome.job
        problem = outcome.state in (State.FAILED, State.IN_DOUBT)
        payload: dict[str, Any] = {
            "path": display(job.file.path),
            "pipeline": job.pipeline,
            "error": outcome.error if problem else None,
            "error_code": outcome.error_code if problem else None,
            "sha256": job.data.get("sha256") or job.file.sha256,
            "sidecar": job.data.get("sidecar"),
            "delivery": job.data.get("delivery"),
        }
        if outcome.state == State.IN_DOUBT:
            doubt = job.data.get("in_doubt", {})
            payload.update(operation=doubt.get("operation"), since=iso(doubt.get("since")))
        self.sender.send_nowait(event, payload)

    def capped(self, budget: str, spent_seconds: float, cap_seconds: float, until: float) -> None:
        if "spend.capped" in self.wanted:
            self.sender.send_nowait(
                "spend.capped",
                {
                    "budget": budget,
                    "service": budget,  # deprecated: the same as budget, until 0.4.0
                    "minutes_today": round(spent_seconds / 60, 2),
                    "cap_minutes": round(cap_seconds / 60, 2),
                    "resumes_at": iso(until),
                },
            )
