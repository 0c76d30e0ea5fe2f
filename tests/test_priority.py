"""Today's files first: a file that arrives while a backlog waits is claimed next, through a real daemon."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import make_settings, query, wait_for, write_tone
from watcher.emulator import Emulator

pytestmark = pytest.mark.timeout(120)
BACKLOG = 150


def claimed(tmp_path, pattern: str) -> int:
    """How many analysis jobs of files whose relative path matches ``pattern`` have been claimed so far."""
    row = query(
        tmp_path,
        "SELECT COUNT(*) FROM jobs j JOIN files f ON f.id = j.file_id WHERE j.claims > 0 AND f.rel_path LIKE ?",
        pattern,
    )
    return int(row[0]) if row else 0


def test_a_new_file_is_claimed_before_the_rest_of_the_backlog(tmp_path, inbox, emulator: Emulator, run_daemon):
    """150 files from two days ago wait at 5 requests/s; a file dropped meanwhile is claimed within a few claims,
    not after the 150 (the backlog keeps being served: it is not starved either)."""
    two_days_ago = time.time() - 2 * 86400
    for n in range(BACKLOG):
        path = write_tone(inbox / f"old{n:03d}.wav", 0.05, freq=200.0 + n)  # distinct contents: no sharing
        os.utime(path, (two_days_ago, two_days_ago))
    settings = make_settings(tmp_path, inbox, emulator.url, rate_limit=5.0, concurrency=2)
    d = run_daemon(settings)
    wait_for(lambda: claimed(tmp_path, "old%") >= 5, timeout=60, what="the backlog being worked")
    write_tone(inbox / "today.wav", 0.05, freq=1000.0)
    wait_for(lambda: query(tmp_path, "SELECT 1 FROM files WHERE rel_path='today.wav'"), what="today.wav settled")
    at_arrival = claimed(tmp_path, "old%")
    wait_for(lambda: claimed(tmp_path, "today.wav"), timeout=60, what="today.wav claimed")
    at_claim = claimed(tmp_path, "old%")
    print(f"backlog claimed: {at_arrival} when today.wav settled, {at_claim} when it was claimed (of {BACKLOG})")
    # in flight at arrival (2) and the backlog's share (one claim in FIRST_RUN + 1) at most, never the 150
    assert at_claim - at_arrival <= 4, (at_arrival, at_claim)
    assert at_claim < BACKLOG // 2
    of = "FROM jobs j JOIN files f ON f.id = j.file_id WHERE f.rel_path"
    live = query(tmp_path, f"SELECT j.live {of} = 'today.wav'")
    old = query(tmp_path, f"SELECT MAX(j.live) {of} LIKE 'old%'")
    assert live == (1,) and old == (0,)
    wait_for(lambda: claimed(tmp_path, "old%") > at_claim, what="the backlog still served after today.wav")
    d.stop()
