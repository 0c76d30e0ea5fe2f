"""An optional Prometheus endpoint (prometheus-client, the ``metrics`` extra).

Files seen, done and failed per pipeline, queue depth, service latency and errors, bytes uploaded.
A registry of its own, so several daemons (or tests) never share counters. ``NullMetrics`` when off.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from watcher.errors import ConfigError


class NullMetrics:
    """Metrics switched off: every call does nothing."""

    def file_seen(self, folder: str) -> None:
        return

    def outcome(self, kind: str, stage: str) -> None:
        return

    def queue(self, counts: Mapping[str, Mapping[str, int]], terminal: frozenset[str]) -> None:
        return

    def request(self, service: str, method: str, seconds: float, outcome: str, sent: int) -> None:
        return

    def stop(self) -> None:
        return


class Metrics(NullMetrics):
    """The real thing, served over HTTP by :meth:`start_http`."""

    def __init__(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise ConfigError('metrics.enabled needs prometheus-client: pip install "watcher[metrics]"') from exc
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.seen = prom.Counter("watcher_files_seen", "File versions that settled, per folder", ["folder"], registry=r)
        self.done = prom.Counter("watcher_files_done", "Jobs finished, per pipeline", ["stage"], registry=r)
        self.failed = prom.Counter(
            "watcher_files_failed", "Jobs that failed for good, per pipeline", ["stage"], registry=r
        )
        self.depth = prom.Gauge("watcher_queue_depth", "Unfinished jobs, per pipeline", ["stage"], registry=r)
        self.latency = prom.Histogram(
            "watcher_service_request_seconds",
            "Service request time",
            ["service"],
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.errors = prom.Counter("watcher_service_errors", "Failed service requests", ["service", "kind"], registry=r)
        self.uploaded = prom.Counter("watcher_bytes_uploaded", "Request body bytes sent", ["service"], registry=r)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def file_seen(self, folder: str) -> None:
        self.seen.labels(folder=folder).inc()

    def outcome(self, kind: str, stage: str) -> None:
        if stage == "done":
            self.done.labels(stage=kind).inc()
        elif stage == "failed":
            self.failed.labels(stage=kind).inc()

    def queue(self, counts: Mapping[str, Mapping[str, int]], terminal: frozenset[str]) -> None:
        for kind, stages in counts.items():
            self.depth.labels(stage=kind).set(sum(n for s, n in stages.items() if s not in terminal))

    def request(self, service: str, method: str, seconds: float, outcome: str, sent: int) -> None:
        self.latency.labels(service=service).observe(seconds)
        if outcome != "ok":
            self.errors.labels(service=service, kind=outcome).inc()
        if sent:
            self.uploaded.labels(service=service).inc(sent)

    def start_http(self, host: str, port: int) -> tuple[str, int]:
        """Serve /metrics in a thread; port 0 picks a free one. Returns the address."""
        server, thread = self._prom.start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = server, thread
        return str(server.server_address[0]), int(server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
