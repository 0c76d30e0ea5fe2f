"""The backlog's pace: waiting files, the rate over the last minutes, and an ETA that knows the daily caps."""

from __future__ import annotations

import time

from watcher.pace import backlog, describe, eta
from watcher.store import NewRevision, Operation, Store

NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC: the next UTC day starts at 1_700_006_400


def test_eta_is_waiting_over_rate_within_the_day():
    """No cap: 100 files at one a second are done in 100 s; nothing finishing means no ETA."""
    assert eta(100, 1.0, NOW) == (NOW + 100, False)
    assert eta(100, 0.0, NOW) == (None, False)
    assert eta(0, 0.0, NOW) == (NOW, False)


def test_a_spent_cap_moves_the_eta_to_later_days():
    """A cap of 10 files a day (600 s at 60 s a file): 100 files take ten UTC days, ending 10 s into the last."""
    midnight = 1_700_006_400.0
    assert eta(100, 1.0, NOW, cap=600, spent_today=600, per_file=60) == (midnight + 9 * 86400 + 10, True)
    assert eta(100, 1.0, NOW, cap=600, spent_today=0, per_file=60) == (midnight + 8 * 86400 + 10, True)
    assert eta(5, 1.0, NOW, cap=600, spent_today=0, per_file=60) == (NOW + 5, False)  # fits today's budget


def test_backlog_from_a_store(tmp_path):
    """Finished jobs in the last 15 minutes give the rate; pending jobs are waiting; the text says the ETA."""
    store = Store(tmp_path / "w.db")
    try:
        store.register_revisions([NewRevision("/in", f"/in/{n}.wav", f"{n}.wav", 1, 1, n) for n in range(40)],
                                 jobs=[("analyze", "analyze")])  # fmt: skip
        for _ in range(10):
            job = store.claim("analyze", "me")
            assert job is not None
            store.release(job, state="done")
        store.gate_take([Operation("ab" * 32, "s", "analyze:key")], "me", budget="analysis", seconds=60.0)
        now = time.time()
        report = backlog(store, {"analysis": 0.0, "processing": 0.0}, now)
        b = report["analyze"]
        assert (b["waiting"], b["finished_recently"], b["rate_per_minute"]) == (30, 10, round(10 / 15, 2))
        assert b["eta_seconds"] == 30 * 90 and not b["capped"]  # 30 files at one per 90 s
        assert "30 waiting" in describe("analyze", b) and "done in about 0 h 45 min" in describe("analyze", b)
        young = backlog(store, {"analysis": 0.0, "processing": 0.0}, now, since=now - 120)["analyze"]
        assert (young["window_minutes"], young["rate_per_minute"]) == (2.0, 5.0)  # up 2 min: not judged over 15
        assert young["eta_seconds"] == 30 * 12
        just_up = backlog(store, {"analysis": 0.0, "processing": 0.0}, now, since=now - 5)["analyze"]
        assert just_up["window_minutes"] == 1  # never less than a minute
        capped = backlog(store, {"analysis": 1.0, "processing": 0.0}, now)["analyze"]  # a minute a day: 6 s a file
        assert capped["capped"] and capped["eta_seconds"] > 86400 * 2
    finally:
        store.close()
