"""The adaptive rate of the HTTP policy: a 429 halves it and its Retry-After holds every request back, the rate
comes back additively, and status polls keep to their share; against the emulator enforcing a limit per key."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, body, make_settings, wait_for, write_tone
from watcher.config import AnalysisConfig, ArchiveConfig
from watcher.emulator import Emulator
from watcher.errors import NotSent
from watcher.services.analysis import AnalysisClient
from watcher.services.http import HttpPolicy
from watcher.services.ratelimit import AdaptiveRate, PollShare

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.bill_exempt("the HTTP policy alone, with no store: no ledger to hold the bill against"),
    pytest.mark.usefixtures("gate_stand_in"),
]

STREAM = "POST /v1/analysis/stream"
MODELS = ["key", "bpm_degara"]


def analyze_all(emu: Emulator, paths: list[Path], **policy: Any) -> AnalysisClient:
    """Analyse ``paths`` at once through one client (errors raised); returns the client, closed. A request not
    sent (429) is asked again, as the gate's next take would: a new call, paced by the same client."""
    client = AnalysisClient(emu.url, API_KEY, policy=HttpPolicy(wait_initial=0.01, wait_jitter=0, **policy))

    async def one(path: Path) -> None:
        for _ in range(4):
            try:
                await client.analyze(body(path), MODELS, lambda *_: None)
                return
            except NotSent:
                continue
        raise AssertionError(f"{path} was refused four times")

    async def go() -> None:
        try:
            await asyncio.gather(*(one(p) for p in paths))
        finally:
            await client.aclose()

    asyncio.run(go())
    return client


def test_a_429_halves_the_rate_and_no_request_comes_before_its_retry_after(tmp_path, emulator):
    """The 429 cuts 10/s to 5/s, recovered at +1/s per second after the pause; the retry arrives after it."""
    emulator.analysis.faults.status_429 = 1
    emulator.analysis.faults.retry_after = 0.5
    client = analyze_all(emulator, [write_tone(tmp_path / "a.wav", 0.2)], rate_per_second=10, rate_recovery=1)
    first, second = emulator.api.requests
    assert (first.route, second.route) == (STREAM, STREAM)
    assert second.arrived - first.arrived >= 0.5  # the retry waited out Retry-After, measured where the service sees it
    pace = client.http.pace
    assert pace.cuts == 1 and pace.since is not None
    assert [pace.current(pace.since + s) for s in (0, 2, 4, 5, 60)] == [5.0, 7.0, 9.0, 10.0, 10.0]
    assert set(emulator.paid().values()) == {1}  # the refused request was not paid


def test_one_burst_of_429s_halves_the_rate_once(tmp_path, emulator):
    """Requests sent together and all refused report one overload: one cut, not one per answer."""
    emulator.analysis.faults.status_429 = 3
    emulator.analysis.faults.retry_after = 0.05
    paths = [write_tone(tmp_path / f"{n}.wav", 0.2, freq=300 + n) for n in range(3)]
    client = analyze_all(emulator, paths, rate_per_second=10, concurrency=3)
    assert emulator.api.counts()[STREAM] == 6  # three refused, three answered
    assert client.http.pace.cuts == 1
    assert sorted(Counter(op for _, op in emulator.paid()).values()) == [3, 3]  # each model once per file


def test_a_long_retry_after_holds_every_request_without_sending(tmp_path, emulator):
    """A Retry-After beyond the in-process wait goes back to the store, and the next request is not sent."""
    emulator.analysis.faults.status_429 = 1
    emulator.analysis.faults.retry_after = 600
    client = AnalysisClient(emulator.url, API_KEY, policy=HttpPolicy(wait_initial=0.01, wait_jitter=0))
    errors: list[BaseException] = []

    async def go() -> None:
        for name in ("a.wav", "b.wav"):
            try:
                await client.analyze(body(write_tone(tmp_path / name, 0.2)), MODELS, lambda *_: None)
            except NotSent as exc:
                errors.append(exc)
        await client.aclose()

    asyncio.run(go())
    assert [type(e) for e in errors] == [NotSent, NotSent]
    assert errors[0].retry_after == pytest.approx(600, abs=5)  # handed to the store, not slept
    assert "asked for no requests" in str(errors[1]) and errors[1].retry_after == pytest.approx(600, abs=5)
    assert emulator.api.counts()[STREAM] == 1  # only the refused one reached the service


def test_recovery_is_additive_up_to_the_ceiling():
    """Each cut halves what the rate is at that moment; recovery adds ``recovery``/s per second, capped."""
    now = [100.0]
    rate = AdaptiveRate(10, floor=1, recovery=1, clock=lambda: now[0])
    assert rate.current() == 10
    assert rate.cut(sent_at=99.9)
    assert rate.current() == 5
    now[0] += 1
    assert not rate.cut(sent_at=99.95)  # sent before the cut: the same overload
    assert rate.current() == 6
    assert rate.cut(sent_at=100.5)
    assert rate.current() == 3
    assert rate.cut(sent_at=101.0, resume_at=103.0)  # recovery waits for the end of the pause
    assert rate.current() == 1.5
    now[0] = 103.0 + 4
    assert rate.current() == 5.5
    for _ in range(6):
        rate.cut(sent_at=now[0])
    assert rate.current() == 1  # never below the floor
    now[0] += 60
    assert rate.current() == 10


def test_polls_get_appointments_at_their_share():
    """Past one slot's wait, a poll gets the next free slot; one arriving when an appointment is due takes it."""
    share = PollShare(0.5, 10)
    waits = [share.admit(10, 0.0) for _ in range(5)]
    assert waits == [None, None, pytest.approx(0.4), pytest.approx(0.6), pytest.approx(0.8)]
    assert share.waiting == 3
    assert share.admit(10, 0.4) is None and share.waiting == 2  # the first appointment, taken when due
    assert share.admit(10, 0.41) == pytest.approx(0.59)  # a newcomer queues behind the others


def test_at_defaults_a_service_limited_to_10_per_second_is_paid_once_and_rarely_refused(tmp_path, inbox, run_daemon):
    """The daemon at default settings against 10 requests/s enforced per key: every file analysed once, few 429s."""
    with Emulator(analysis_key=API_KEY, use_local=False) as emu:
        analysis, _ = emu.limit(10) or (None, None)
        assert analysis is not None
        files = [write_tone(inbox / f"t{n:02}.wav", 0.1, freq=200 + n) for n in range(40)]
        settings = make_settings(tmp_path, inbox, emu.url)
        assert (settings.analysis.rate_limit, settings.analysis.concurrency) == (10, AnalysisConfig().concurrency)
        run_daemon(settings)
        sidecars = [f.with_name(f.name + ".analysis.json") for f in files]
        wait_for(lambda: all(s.exists() for s in sidecars), timeout=60, what="every sidecar")
        paid = emu.paid()
        assert len(paid) == 40 * 3 and set(paid.values()) == {1}  # each (content, model) paid exactly once
        assert analysis.admitted[STREAM] == 40
        assert analysis.refused[STREAM] <= 4, f"429s: {analysis.refused[STREAM]} for 40 files"


def test_polls_keep_to_half_the_processing_rate_while_uploads_wait(tmp_path, inbox, run_daemon):
    """Jobs in progress forever, polls due all the time, 10/s enforced: polls stay within 5/s, uploads all go."""
    with Emulator(processing_key="pk", use_local=False) as emu:
        emu.processing.faults.polls_needed = 10**9
        _, processing = emu.limit(10) or (None, None)
        assert processing is not None
        count = 30
        for n in range(count):
            write_tone(inbox / f"t{n:02}.wav", 0.1, freq=200 + n)
        cfg = ArchiveConfig(
            enabled=True,
            base_url=emu.url,
            api_key="pk",
            output_dir=tmp_path / "out",
            versions=("original",),
            poll_initial=0.05,
            poll_max=0.2,
        )
        settings = make_settings(tmp_path, inbox, emu.url).model_copy(
            update={"archive": cfg, "analysis": AnalysisConfig(enabled=False)}
        )
        assert cfg.rate_limit == 10
        d = run_daemon(settings)
        wait_for(lambda: processing.admitted["POST /from-file"] == count, timeout=60, what="every upload")
        d.stop()
        seen = [r for r in emu.api.requests if not r.refused]
        uploads = [r.arrived for r in seen if r.route == "POST /from-file"]
        start, end = min(uploads), max(uploads)
        polls = [r.arrived for r in seen if r.route == "GET /status" and start <= r.arrived <= end]
        assert len(polls) >= 3  # polls were due all along: the share was in use
        # At most half of 10/s over the window, plus the share's one-second burst.
        assert len(polls) <= 5 * (end - start) + 5, f"{len(polls)} polls in {end - start:.1f} s"
        assert set(emu.paid().values()) == {1}  # each upload paid once


def test_each_services_rate_is_a_gauge(tmp_path, inbox, emulator):
    """watcher_service_rate shows the adaptive rate of each service: the configured one, then half after a 429."""
    from tests.test_metrics import sample
    from watcher.app import App
    from watcher.metrics import Metrics

    metrics = Metrics()
    app = App.build(make_settings(tmp_path, inbox, emulator.url))
    for service, current in app.rates().items():
        metrics.watch_rate(service, current)
    series = 'watcher_service_rate{service="analysis service"}'
    assert sample(metrics.exposition(), series) == 10.0
    emulator.analysis.faults.status_429 = 1
    emulator.analysis.faults.retry_after = 600  # recovery starts after the pause: the rate stays at half

    async def refused_once() -> None:
        backend = app.pipelines["analyze"].backend  # type: ignore[attr-defined]
        with pytest.raises(NotSent):
            await backend.analyze(body(write_tone(tmp_path / "a.wav", 0.2)), MODELS, lambda *_: None)
        await app.aclose()

    asyncio.run(refused_once())
    assert sample(metrics.exposition(), series) == 5.0
