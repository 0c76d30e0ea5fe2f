"""The Prometheus endpoint: values recorded are the values scraped over real HTTP."""

from __future__ import annotations

import inspect
import socket
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from watcher.errors import ConfigError
from watcher.metrics import Metrics, NullMetrics


@pytest.fixture
def served() -> Iterator[tuple[Metrics, str]]:
    """A Metrics serving on a free loopback port, and its /metrics URL."""
    metrics = Metrics()
    host, port = metrics.start_http("127.0.0.1", 0)
    yield metrics, f"http://{host}:{port}/metrics"
    metrics.stop()


def sample(text: str, name: str) -> float | None:
    """The value of one sample line (``name`` includes its labels) in exposition text, or None."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_recorded_values_are_scraped(served):
    """Every metric appears under its documented name and labels with the value recorded."""
    metrics, url = served
    metrics.file_seen("/srv/audio/inbox")
    metrics.file_seen("/srv/audio/inbox")
    metrics.file_done("analyze")
    metrics.file_failed("archive")
    metrics.set_queue_depth("analyze", 7)
    metrics.service_request("analysis", 0.2)
    metrics.service_request("analysis", 3.0)
    metrics.service_error("processing", "retry_later")
    metrics.bytes_uploaded("processing", 1_048_576)
    text = httpx.get(url, timeout=5).text

    assert sample(text, 'watcher_files_seen_total{folder="/srv/audio/inbox"}') == 2.0
    assert sample(text, 'watcher_files_done_total{pipeline="analyze"}') == 1.0
    assert sample(text, 'watcher_files_failed_total{pipeline="archive"}') == 1.0
    assert sample(text, 'watcher_queue_depth{pipeline="analyze"}') == 7.0
    assert sample(text, 'watcher_service_request_seconds_count{service="analysis"}') == 2.0
    assert sample(text, 'watcher_service_request_seconds_sum{service="analysis"}') == pytest.approx(3.2)
    assert sample(text, 'watcher_service_request_seconds_bucket{le="0.25",service="analysis"}') == 1.0
    assert sample(text, 'watcher_service_errors_total{kind="retry_later",service="processing"}') == 1.0
    assert sample(text, 'watcher_bytes_uploaded_total{service="processing"}') == 1_048_576.0
    for name in ("counter", "gauge", "histogram"):
        assert f" {name}\n" in text
    assert sample(metrics.exposition(), 'watcher_files_done_total{pipeline="analyze"}') == 1.0


def test_daemon_adapters_feed_the_same_metrics(served):
    """The runner-outcome, store-count and request-observer adapters land in the named series."""
    metrics, url = served
    metrics.outcome("analyze", "done")
    metrics.outcome("analyze", "uploading")
    metrics.outcome("archive", "failed")
    metrics.queue({"analyze": {"queued": 3, "done": 9}, "archive": {"waiting": 2}}, frozenset({"done", "failed"}))
    metrics.request("analysis", "POST", 0.5, "ok", 4096)
    metrics.request("analysis", "POST", 0.1, "needs_user", 0)
    text = httpx.get(url, timeout=5).text
    assert sample(text, 'watcher_files_done_total{pipeline="analyze"}') == 1.0
    assert sample(text, 'watcher_files_failed_total{pipeline="archive"}') == 1.0
    assert sample(text, 'watcher_queue_depth{pipeline="analyze"}') == 3.0
    assert sample(text, 'watcher_queue_depth{pipeline="archive"}') == 2.0
    assert sample(text, 'watcher_service_request_seconds_count{service="analysis"}') == 2.0
    assert sample(text, 'watcher_service_errors_total{kind="needs_user",service="analysis"}') == 1.0
    assert sample(text, 'watcher_bytes_uploaded_total{service="analysis"}') == 4096.0

    metrics.queue({"analyze": {"queued": 1}}, frozenset({"done"}))
    text = httpx.get(url, timeout=5).text
    assert sample(text, 'watcher_queue_depth{pipeline="archive"}') == 0.0, "an emptied pipeline shows 0"


def test_paid_requests_are_scraped_under_the_new_names_and_the_deprecated_ones(served):
    """A paid request is counted per budget and ending, and (until 0.4.0) under the earlier names and labels,
    per service and outcome, with the same values."""
    metrics, url = served
    metrics.paid_call("processing", "upload", "answered", 90.0)
    metrics.paid_call("processing", "upload", "not_sent", 0.0)
    text = httpx.get(url, timeout=5).text
    new = 'watcher_paid_requests_total{budget="processing",ending="%s",operation="upload"}'
    old = 'watcher_paid_calls_total{operation="upload",outcome="%s",service="processing"}'
    for ending in ("answered", "not_sent"):
        assert sample(text, new % ending) == sample(text, old % ending) == 1.0
    assert sample(text, 'watcher_paid_audio_seconds_total{budget="processing"}') == 90.0
    assert sample(text, 'watcher_audio_seconds_total{service="processing"}') == 90.0
    assert "Deprecated (removed in 0.4.0)" in text


def test_two_instances_keep_their_own_counts():
    """Each Metrics has its own registry, so two in one process count separately."""
    a, b = Metrics(), Metrics()
    a.file_done("analyze")
    a.file_done("analyze")
    b.file_done("analyze")
    assert sample(a.exposition(), 'watcher_files_done_total{pipeline="analyze"}') == 2.0
    assert sample(b.exposition(), 'watcher_files_done_total{pipeline="analyze"}') == 1.0


def test_stop_closes_the_port():
    """After stop() the port refuses connections."""
    metrics = Metrics()
    host, port = metrics.start_http("127.0.0.1", 0)
    assert httpx.get(f"http://{host}:{port}/metrics", timeout=5).status_code == 200
    metrics.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{host}:{port}/metrics", timeout=5)
    metrics.stop()


def test_a_busy_port_is_a_config_error():
    """A port already taken gives a ConfigError naming the address and the keys to change."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*metrics.port"):
            Metrics().start_http("127.0.0.1", port)


def test_null_metrics_has_every_recording_method():
    """NullMetrics answers every public method of Metrics but start_http and exposition, and does nothing."""
    null = NullMetrics()
    public = {n for n, v in vars(Metrics).items() if callable(v) and not n.startswith("_")}
    assert public - {"start_http", "exposition"} <= set(dir(null))
    for name in public - {"start_http", "exposition"}:
        params = inspect.signature(getattr(Metrics, name)).parameters
        assert list(params) == list(inspect.signature(getattr(NullMetrics, name)).parameters), name
    null.file_seen("/x")
    null.request("analysis", "POST", 1.0, "retry_later", 10)
    null.queue({"analyze": {"queued": 1}}, frozenset())
    null.stop()


def test_without_prometheus_client_metrics_is_a_config_error():
    """With prometheus-client not importable, Metrics() raises ConfigError saying how to install it."""
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from watcher.errors import ConfigError\n"
        "from watcher.metrics import Metrics\n"
        "try:\n    Metrics()\nexcept ConfigError as exc:\n    print('ConfigError:', exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    needs = 'ConfigError: metrics.enabled = true needs prometheus-client: pip install "watcher-audio[metrics]"'
    assert needs in proc.stdout


def test_backlog_gauges_per_pipeline(tmp_path):
    """Waiting files, the recent rate and the ETA of a real store's backlog are gauges per pipeline (NaN: unknown)."""
    import math

    from watcher.pace import backlog
    from watcher.store import NewRevision, Store

    store = Store(tmp_path / "w.db")
    try:
        revisions = [NewRevision("/in", f"/in/{n}.wav", f"{n}.wav", 1, 1, n) for n in range(6)]
        store.register_revisions(revisions, jobs=[("analyze", "analyze"), ("archive", "check")])
        job = store.claim("analyze", "me")
        assert job is not None
        store.release(job, state="done")
        metrics = Metrics()
        metrics.backlog(backlog(store, {"analysis": 0.0, "processing": 0.0}))
    finally:
        store.close()
    text = metrics.exposition()
    assert sample(text, 'watcher_backlog_waiting{pipeline="analyze"}') == 5.0
    assert sample(text, 'watcher_backlog_rate_per_minute{pipeline="analyze"}') == round(1 / 15, 2)
    assert 0 < sample(text, 'watcher_backlog_eta_seconds{pipeline="analyze"}') <= 5 * 900
    assert math.isnan(sample(text, 'watcher_backlog_eta_seconds{pipeline="archive"}'))  # nothing finished yet
