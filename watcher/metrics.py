"""An optional Prometheus endpoint (prometheus-client, the ``metrics`` extra, imported only when used).

Files seen, done and failed, queue depth, service latency and errors, bytes uploaded. Each ``Metrics``
has a registry of its own, so several daemons (or tests) in one process never share counters.
``NullMetrics`` has the same recording methods and does nothing: the daemon uses it when metrics are off.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from watcher.errors import ConfigError

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


class NullMetrics:
    """Metrics switched off: every call does nothing."""

    def file_seen(self, folder: str) -> None:
        """A new revision settled in ``folder``."""

    def file_done(self, pipeline: str) -> None:
        """A job of ``pipeline`` (analyze, archive) finished."""

    def file_failed(self, pipeline: str) -> None:
        """A job of ``pipeline`` failed for good."""

    def set_queue_depth(self, pipeline: str, depth: int) -> None:
        """``depth`` unfinished jobs wait in ``pipeline``."""

    def service_request(self, service: str, seconds: float) -> None:
        """One request to ``service`` took ``seconds`` (whatever its code)."""

    def service_error(self, service: str, kind: str) -> None:
        """A request to ``service`` failed; ``kind`` is its error code (retry_later, needs_user, rejected)."""

    def bytes_uploaded(self, service: str, count: int) -> None:
        """``count`` request body bytes were sent to ``service``."""

    def paid_call(self, budget: str, operation: str, ending: str, seconds: float) -> None:
        """A paid request of ``budget`` ended (``ending``: answered, not_sent, in_doubt, partial), covering
        ``seconds`` of audio."""

    def loop_lag(self, seconds: float) -> None:
        """How late the event loop last woke up."""

    def watch_rate(self, service: str, current: Callable[[], float]) -> None:
        """``current()`` is the rate ``service`` is sent at now, in requests/s (the adaptive rate)."""

    def outcome(self, pipeline: str, state: str) -> None:
        """A runner outcome: a job of ``pipeline`` reached ``state``; only "done" and "failed" are counted."""
        if state == "done":
            self.file_done(pipeline)
        elif state == "failed":
            self.file_failed(pipeline)

    def queue(self, counts: Mapping[str, Mapping[str, int]], terminal: frozenset[str]) -> None:
        """Queue depth per pipeline from the store's counts ({pipeline: {state: n}}), final states left out."""
        for pipeline, states in counts.items():
            self.set_queue_depth(pipeline, sum(n for s, n in states.items() if s not in terminal))

    wants_backlog = False  # whether the daemon should compute the backlog for :meth:`backlog`

    def backlog(self, report: Mapping[str, Mapping[str, Any]]) -> None:
        """The backlog per pipeline (see watcher.pace.backlog): waiting, rate per minute, seconds to done."""

    def request(self, service: str, method: str, seconds: float, code: str, sent: int) -> None:
        """The HTTP policy's request observer (watcher.services.http.RequestObserver): ``code``, "ok" or an error."""
        self.service_request(service, seconds)
        if code != "ok":
            self.service_error(service, code)
        if sent:
            self.bytes_uploaded(service, sent)

    def stop(self) -> None:
        """Stop serving (nothing to stop here)."""


class Metrics(NullMetrics):
    """The real thing, served over HTTP by :meth:`start_http`; raises ConfigError without prometheus-client."""

    wants_backlog = True

    def __init__(self, node: str | None = None) -> None:
        """``node`` (several machines on one store): every sample served carries a ``node`` label."""
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise ConfigError(
                'metrics.enabled = true needs prometheus-client: pip install "watcher-audio[metrics]", '
                "or set metrics.enabled = false"
            ) from exc
        self._prom = prom
        self.registry = prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        # prometheus-client adds the _total suffix to counters: watcher_files_seen -> watcher_files_seen_total.
        self._seen = prom.Counter(
            "watcher_files_seen", "Revisions that settled, per folder", ["folder"], registry=r
        )
        self._done = prom.Counter("watcher_files_done", "Jobs finished, per pipeline", ["pipeline"], registry=r)
        self._failed = prom.Counter(
            "watcher_files_failed", "Jobs failed for good, per pipeline", ["pipeline"], registry=r
        )
        self._depth = prom.Gauge("watcher_queue_depth", "Unfinished jobs, per pipeline", ["pipeline"], registry=r)
        self._latency = prom.Histogram(
            "watcher_service_request_seconds",
            "Time of one request to a service",
            ["service"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self._errors = prom.Counter(
            "watcher_service_errors", "Failed service requests, per error class", ["service", "kind"], registry=r
        )
        self._uploaded = prom.Counter(
            "watcher_bytes_uploaded", "Request body bytes sent, per service", ["service"], registry=r
        )
        self._paid, self._audio, self._paid_old, self._audio_old = self._paid_counters(prom, r)
        self._lag = prom.Gauge("watcher_loop_lag_seconds", "How late the event loop last woke up", registry=r)
        self._rate = prom.Gauge(
            "watcher_service_rate",
            "Requests per second a service is sent at now: the configured rate, halved on a 429, recovered additively",
            ["service"],
            registry=r,
        )
        self._backlog = self._backlog_gauges(prom, r)
        self._served = r
        if node:
            self._served = prom.CollectorRegistry(auto_describe=False)
            self._served.register(_NodeLabel(r, node))
        self._depth_labels: set[str] = set()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    @staticmethod
    def _paid_counters(prom: Any, r: Any) -> tuple[Any, Any, Any, Any]:
        """Paid requests per budget, operation and ending, and their audio seconds per budget; then the same two
        under their deprecated names and labels (service, outcome), served with the same values until 0.4.0."""
        return (
            prom.Counter(
                "watcher_paid_requests",
                "Paid requests, per budget, operation and ending",
                ["budget", "operation", "ending"],
                registry=r,
            ),
            prom.Counter(
                "watcher_paid_audio_seconds",
                "Audio seconds covered by paid requests, per budget",
                ["budget"],
                registry=r,
            ),
            prom.Counter(
                "watcher_paid_calls",
                "Deprecated (removed in 0.4.0): watcher_paid_requests_total{budget,operation,ending}",
                ["service", "operation", "outcome"],
                registry=r,
            ),
            prom.Counter(
                "watcher_audio_seconds",
                "Deprecated (removed in 0.4.0): watcher_paid_audio_seconds_total{budget}",
                ["service"],
                registry=r,
            ),
        )

    @staticmethod
    def _backlog_gauges(prom: Any, r: Any) -> dict[str, Any]:
        """The backlog's gauges per pipeline: waiting, rate per minute, seconds to done."""
        return {
            key: prom.Gauge(f"watcher_backlog_{key}", text, ["pipeline"], registry=r)
            for key, text in (
                ("waiting", "Files waiting (pending jobs), per pipeline"),
                ("rate_per_minute", "Jobs finished per minute over the last 15 minutes, per pipeline"),
                (
                    "eta_seconds",
                    "Seconds until the backlog is done at that rate, knowing the daily caps (NaN: unknown)",
                ),
            )
        }

    def file_seen(self, folder: str) -> None:
        self._seen.labels(folder=folder).inc()

    def file_done(self, pipeline: str) -> None:
        self._done.labels(pipeline=pipeline).inc()

    def file_failed(self, pipeline: str) -> None:
        self._failed.labels(pipeline=pipeline).inc()

    def set_queue_depth(self, pipeline: str, depth: int) -> None:
        self._depth_labels.add(pipeline)
        self._depth.labels(pipeline=pipeline).set(depth)

    def queue(self, counts: Mapping[str, Mapping[str, int]], terminal: frozenset[str]) -> None:
        # A pipeline that has emptied out no longer appears in the counts: show 0, not its last depth.
        for pipeline in self._depth_labels - set(counts):
            self.set_queue_depth(pipeline, 0)
        super().queue(counts, terminal)

    def backlog(self, report: Mapping[str, Mapping[str, Any]]) -> None:
        for pipeline, b in report.items():
            self._backlog["waiting"].labels(pipeline).set(b["waiting"])
            self._backlog["rate_per_minute"].labels(pipeline).set(b["rate_per_minute"])
            eta = b["eta_seconds"]
            self._backlog["eta_seconds"].labels(pipeline).set(float("nan") if eta is None else eta)

    def paid_call(self, budget: str, operation: str, ending: str, seconds: float) -> None:
        self._paid.labels(budget=budget, operation=operation, ending=ending).inc()
        self._paid_old.labels(service=budget, operation=operation, outcome=ending).inc()
        if seconds > 0:
            self._audio.labels(budget=budget).inc(seconds)
            self._audio_old.labels(service=budget).inc(seconds)

    def loop_lag(self, seconds: float) -> None:
        self._lag.set(max(0.0, seconds))

    def watch_rate(self, service: str, current: Callable[[], float]) -> None:
        self._rate.labels(service=service).set_function(current)

    def service_request(self, service: str, seconds: float) -> None:
        self._latency.labels(service=service).observe(max(0.0, seconds))

    def service_error(self, service: str, kind: str) -> None:
        self._errors.labels(service=service, kind=kind).inc()

    def bytes_uploaded(self, service: str, count: int) -> None:
        if count > 0:
            self._uploaded.labels(service=service).inc(count)

    def exposition(self) -> str:
        """The current values in Prometheus' text format, as /metrics serves them."""
        return str(self._prom.generate_latest(self._served).decode())

    def start_http(self, host: str, port: int) -> tuple[str, int]:
        """Serve /metrics from a background thread; port 0 picks a free one. Returns the address it listens on."""
        if self.address is not None:
            return self.address
        try:
            server, thread = self._prom.start_http_server(port, addr=host, registry=self._served)
        except OSError as exc:
            raise ConfigError(
                f"metrics endpoint cannot listen on {host}:{port}: {exc.strerror or exc} "
                "(change metrics.host or metrics.port)"
            ) from exc
        self._server, self._thread = server, thread
        self.address = (str(server.server_address[0]), int(server.server_address[1]))
        return self.address

    def stop(self) -> None:
        """Stop serving and close the port; recorded values stay readable through :meth:`exposition`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.address = None


class _NodeLabel:
    """A collector serving another registry's samples with a ``node`` label added."""

    def __init__(self, inner: Any, node: str) -> None:
        self.inner = inner
        self.node = node

    def collect(self) -> Any:
        for family in self.inner.collect():
            family.samples = [s._replace(labels={**s.labels, "node": self.node}) for s in family.samples]
            yield family
