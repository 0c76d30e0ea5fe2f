"""Whether a paid request was handed to the transport is read from its take's wire ticket (spent as it is handed
over), passed to ``ending_of`` explicitly: stopped before (waiting for its turn in the rate) it is ``not_sent``
and freed; handed over and then lost it is ``in_doubt``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import API_KEY, body, write_tone
from watcher.emulator import Emulator
from watcher.errors import NotSent, RetryLater
from watcher.pipelines.paid import Taken, ending_of
from watcher.sending import WireTicket, issue
from watcher.services.analysis import STREAM_PATH, AnalysisClient
from watcher.services.http import HttpPolicy

pytestmark = pytest.mark.timeout(60)


@pytest.mark.bill_exempt("the client alone on hand-made tickets, as a gate would issue them: no ledger")
def test_a_paid_request_stopped_before_the_transport_is_not_sent_and_one_handed_over_is_in_doubt(tmp_path: Path):
    audio = write_tone(tmp_path / "a.wav", 0.2)
    with Emulator(analysis_key=API_KEY, use_local=False) as emu:

        async def go() -> tuple[Taken, Taken]:
            # one request every 10 s: the second waits for its turn in the rate, before any transport
            client = AnalysisClient(emu.url, API_KEY, policy=HttpPolicy(attempts=1, rate_per_second=0.1))
            try:
                first = Taken([], 0.2, wire=issue(WireTicket(1, ("analyze:key",))))
                await client.analyze(body(audio), ["key"], lambda r: None)
                second = Taken([], 0.2, wire=issue(WireTicket(2, ("analyze:key",))))
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(client.analyze(body(audio), ["key"], lambda r: None), 1.0)
                return first, second
            finally:
                await client.aclose()

        first, second = asyncio.run(go())
        assert emu.api.counts()[f"POST {STREAM_PATH}"] == 1
    assert first.wire is not None and first.wire.used
    assert second.wire is not None and not second.wire.used
    assert ending_of(TimeoutError(), second) == "not_sent"  # stopped while waiting: provably nothing sent
    assert ending_of(RetryLater("stream cut"), first) == "in_doubt"  # handed over, then lost
    assert ending_of(NotSent("429"), first) == "not_sent"  # handed over, and provably not processed
    assert ending_of(RetryLater("stream cut"), None) == "not_sent"  # no take: nothing was sent on it


class _HeldBack:
    """An audio body that sends all but its last chunk, then waits (a slow disk, a stop arriving mid-upload)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.name = "held.wav"
        self.size = len(data)
        self.most_sent = asyncio.Event()

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.data[:-1000]
        self.most_sent.set()
        await asyncio.Event().wait()  # the last 1000 bytes never come
        yield self.data[-1000:]


@pytest.mark.bill_exempt("the client alone on hand-made tickets, as a gate would issue them: no ledger")
def test_a_stream_stopped_before_its_body_ended_is_not_sent_and_one_stopped_after_is_in_doubt(tmp_path: Path):
    """Stopped mid-body (a stop, a reload), the request cannot have reached the service whole: ``not_sent``, free
    again (it was recorded in doubt and its minutes counted against the day's cap). Stopped while the answer
    streams back, after the whole body left: ``in_doubt``."""
    audio = write_tone(tmp_path / "a.wav", 0.5)
    with Emulator(analysis_key=API_KEY, use_local=False) as emu:

        async def go() -> tuple[Taken, Taken]:
            client = AnalysisClient(emu.url, API_KEY, policy=HttpPolicy(attempts=1))
            try:
                cut = Taken([], 0.5, wire=issue(WireTicket(1, ("analyze:key",))))
                held = _HeldBack(audio.read_bytes())
                sending = asyncio.ensure_future(client.analyze(held, ["key"], lambda r: None))
                await asyncio.wait_for(held.most_sent.wait(), 10)
                sending.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await sending
                emu.analysis.faults.event_delay = 5.0  # the whole body arrives; its answer is slow
                whole = Taken([], 0.5, wire=issue(WireTicket(2, ("analyze:key",))))
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(client.analyze(body(audio), ["key"], lambda r: None), 2.0)
                return cut, whole
            finally:
                await client.aclose()

        cut, whole = asyncio.run(go())
    assert cut.wire is not None and cut.wire.used and cut.wire.partial_body
    assert ending_of(asyncio.CancelledError(), cut) == "not_sent"
    assert whole.wire is not None and whole.wire.used and not whole.wire.partial_body
    assert ending_of(asyncio.CancelledError(), whole) == "in_doubt"


@pytest.mark.bill_exempt("the client alone on a hand-made ticket, as a gate would issue it: no ledger")
def test_a_stream_held_by_the_bandwidth_limit_is_partial_until_its_last_byte_is_asked_for(tmp_path: Path):
    """Under `bwlimit` a body's piece is taken first and sent later: a one-piece body stopped while the limit holds
    it has not reached the service, and is still partial (it was marked whole as soon as the limit took it)."""
    from watcher.config.bwlimit import parse_bwlimit
    from watcher.services.bandwidth import Bandwidth

    audio = write_tone(tmp_path / "a.wav", 1.0)  # about 176 kB: one piece, many seconds at 8 kB/s
    with Emulator(analysis_key=API_KEY, use_local=False) as emu:

        async def go() -> Taken:
            limit = Bandwidth(parse_bwlimit("8k"))
            client = AnalysisClient(emu.url, API_KEY, policy=HttpPolicy(attempts=1, bandwidth=limit))
            try:
                cut = Taken([], 1.0, wire=issue(WireTicket(1, ("analyze:key",))))
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(client.analyze(body(audio), ["key"], lambda r: None), 1.0)
                return cut
            finally:
                await client.aclose()

        cut = asyncio.run(go())
        assert emu.analysis.bytes_received == 0  # no whole body arrived
    assert cut.wire is not None and cut.wire.used and cut.wire.partial_body
    assert ending_of(asyncio.CancelledError(), cut) == "not_sent"
