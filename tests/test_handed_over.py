"""Whether a paid request was handed to the transport is read from its take's wire ticket (spent as it is handed
over), passed to ``ending_of`` explicitly: stopped before (waiting for its turn in the rate) it is ``not_sent``
and freed; handed over and then lost it is ``in_doubt``."""

from __future__ import annotations

import asyncio
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
