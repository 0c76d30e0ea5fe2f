"""Today's files first: a file that arrives while a backlog waits is claimed next, through a real daemon."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import make_settings, query, wait_for, write_tone
from watcher.control import ask
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


def old_backlog(inbox, count: int) -> None:
    """``count`` files from two days ago, with distinct contents (no sharing of results)."""
    two_days_ago = time.time() - 2 * 86400
    for n in range(count):
        path = write_tone(inbox / f"old{n:03d}.wav", 0.05, freq=200.0 + n)
        os.utime(path, (two_days_ago, two_days_ago))


def last_waiting(tmp_path) -> str:
    """The relative path of the backlog file the claim order would reach last (its job is not claimed yet)."""
    row = query(
        tmp_path,
        "SELECT f.rel_path FROM jobs j JOIN files f ON f.id = j.file_id WHERE j.claims = 0 AND j.state = 'pending' "
        "ORDER BY j.next_attempt_at DESC, j.id DESC LIMIT 1",
    )
    assert row is not None
    return str(row[0])


def test_scanning_a_file_already_waiting_moves_it_to_the_front(tmp_path, inbox, emulator: Emulator, run_daemon):
    """150 files from two days ago wait at 2 requests/s; `watcher scan` of the one the backlog would reach last,
    through the daemon's control socket, has it claimed within a few claims (it was left in backlog order), says
    so (1 file moved), and the backlog is still served after it."""
    old_backlog(inbox, BACKLOG)
    settings = make_settings(tmp_path, inbox, emulator.url, rate_limit=2.0, concurrency=2)
    d = run_daemon(settings)
    wait_for(lambda: claimed(tmp_path, "old%") >= 3, timeout=60, what="the backlog being worked")
    target = last_waiting(tmp_path)
    with ThreadPoolExecutor(1) as pool:  # the scan answers once its file is done
        at_scan = claimed(tmp_path, "old%")
        answer = pool.submit(ask, settings.state_dir, {"command": "scan", "paths": [str(inbox / target)]})
        wait_for(lambda: claimed(tmp_path, target), timeout=60, what=f"{target} claimed")
        at_claim = claimed(tmp_path, "old%")
        result = answer.result(timeout=60)
    print(f"backlog claimed: {at_scan} at the scan of {target}, {at_claim} when it was claimed (of {BACKLOG})")
    assert result["exit"] == 0 and result["problems"] == [] and result["promoted"] == 1, result
    # in flight at the scan (2), the scan's own wait for its file to be looked at, and the backlog's share at most
    assert at_claim - at_scan <= 6, (at_scan, at_claim)
    live = query(tmp_path, "SELECT j.live FROM jobs j JOIN files f ON f.id = j.file_id WHERE f.rel_path = ?", target)
    assert live == (1,)
    wait_for(lambda: claimed(tmp_path, "old%") > at_claim, what="the backlog still served after the scanned file")
    d.stop()


def test_scanning_a_waiting_file_without_a_daemon_processes_it_first(tmp_path, inbox, emulator: Emulator):
    """No daemon: 12 old files recorded as backlog by an earlier run; `watcher scan` of the last one moves it to the
    front (the answer counts it) and it is the first file done, though the scan processes all that waits."""
    from watcher.commands import scan
    from watcher.store import Store

    old_backlog(inbox, 12)
    settings = make_settings(tmp_path, inbox, emulator.url, concurrency=1)
    store = Store(tmp_path / "state" / "watcher.db")
    try:
        for n, path in enumerate(sorted(inbox.iterdir())):
            st = path.stat()
            store.register_revision(
                folder=str(inbox), path=str(path), rel_path=path.name, size=st.st_size, mtime_ns=st.st_mtime_ns,
                inode=st.st_ino, jobs=[("analyze", "analyze")], now=1000.0 + n,
            )  # fmt: skip
    finally:
        store.close()
    code, problems, promoted, paused = asyncio.run(scan(settings, [inbox / "old011.wav"]))
    order = query(tmp_path, "SELECT GROUP_CONCAT(rel_path) FROM (SELECT f.rel_path FROM jobs j JOIN files f "
                            "ON f.id = j.file_id WHERE j.state = 'done' ORDER BY j.updated_at, j.id)")  # fmt: skip
    assert order is not None
    done = str(order[0]).split(",")
    assert len(done) == 12 and done[0] == "old011.wav", done
    assert (code, problems, promoted, paused) == (0, [], 1, {})
