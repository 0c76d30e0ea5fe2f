"""The outage journal and the guard in front of the store: answers kept on disk (fsynced, bounded, a torn last
record ignored), replayed into the store once and idempotently, claims paused while SQLite is locked."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import wait_for
from watcher.store import Fence, Operation, Store, StoredResult, utc_day
from watcher.store.away import OUTAGE_FILE, StoreAway, read_outage, unavailable
from watcher.store.journal import Journal, apply, encode
from watcher.store.outage import OutageGuard

OP = Operation("ab" * 32, "analysis http://x acct", "analyze:key", on_doubt="reask")
RESULT = StoredResult("key", "key", "1.0", "c-1", {"key": "A", "scale": "minor"})


def record(n: int) -> dict[str, object]:
    return {"kind": "ledger_ending", "request": n, "ending": "answered"}


def test_every_append_is_fsynced_and_read_back_after_reopening(tmp_path, monkeypatch):
    """Each record is fsynced before append returns; a new Journal on the same file reads them all, in order."""
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    journal = Journal(tmp_path / "j")
    for n in range(3):
        before = len(synced)
        journal.append(record(n))
        assert len(synced) > before
    journal.close()
    again = Journal(tmp_path / "j")
    assert again.records() == [record(n) for n in range(3)]
    assert again.dropped_tail == 0


def test_a_torn_last_record_after_a_kill_is_ignored_and_cut_off(tmp_path):
    """A process appending in a loop is SIGKILLed: every whole record is read back; a half-written last line and
    one whose checksum fails are ignored, cut off, and the next record follows a whole line."""
    path = tmp_path / "j"
    script = (
        "import sys; from watcher.store.journal import Journal\n"
        "j = Journal(__import__('pathlib').Path(sys.argv[1]))\n"
        "n = 0\n"
        "while True:\n"
        "    j.append({'kind': 'ledger_ending', 'request': n, 'ending': 'answered', 'pad': 'x' * 500}); n += 1\n"
        "    print(n, flush=True) if n == 50 else None\n"
    )
    with subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "50"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    kept = Journal(path).records()
    assert len(kept) >= 50 and [r["request"] for r in kept] == list(range(len(kept)))
    whole = path.stat().st_size
    with open(path, "ab") as f:  # what a kill in the middle of a write leaves: half a line
        f.write(b'0badc0de {"kind": "gate_answ')
    journal = Journal(path)
    assert len(journal) == len(kept) and journal.dropped_tail > 0 and path.stat().st_size == whole
    journal.append(record(-1))
    with open(path, "ab") as f:  # a whole line whose checksum does not match: ends the journal too
        f.write(b'00000000 {"kind":"ledger_outcome","outcome":"answered","request":7}\n')
    journal.close()
    assert [r["request"] for r in Journal(path).records()][-1] == -1


def test_the_journal_is_bounded_and_no_paid_call_starts_when_it_is_full(tmp_path):
    """Past ``max_bytes`` the journal says full (answers of calls already sent are still taken): the guard refuses
    a new take until it is replayed and emptied."""
    store = Store(tmp_path / "w.db")
    journal = Journal(tmp_path / "j", max_bytes=300)
    guard = OutageGuard(store, journal)
    while not journal.full:
        journal.append(record(len(journal)))
    journal.append(record(99))  # still taken
    with pytest.raises(StoreAway, match="journal is full"):
        guard.gate_take([OP], "me", budget="analysis", seconds=1.0)
    journal.clear(len(journal))
    assert not journal.full
    assert guard.gate_take([OP], "me", budget="analysis", seconds=1.0)[0].verdict == "send"
    guard.close()


def _taken(store: Store) -> tuple[Fence, int]:
    ticket = store.gate_take([OP], "node-a:1:1", budget="analysis", seconds=2.0)[0]
    assert ticket.verdict == "send" and ticket.fence is not None and ticket.request is not None
    return ticket.fence, ticket.request


def _state(store: Store) -> tuple[object, ...]:
    row = store.gate_get(OP)
    assert row is not None
    lines = [(line["outcome"], line["seconds"]) for line in store.ledger_lines(utc_day(time.time()), "9999-12-31")]
    return row["state"], row["holder"], dict(store.results_for(OP.sha256, OP.service)), lines


def test_replaying_a_record_twice_leaves_the_same_state(tmp_path):
    """A kill between replay and clearing the journal replays the same records again: nothing changes the second
    time (the answer, its result, the ledger line and the day's spend stay as the first replay made them)."""
    store = Store(tmp_path / "w.db")
    fence, request = _taken(store)
    records = [
        encode("save_result", (OP.sha256, OP.service, RESULT, OP, fence), {}),
        encode("ledger_ending", (request, "answered"), {}),
    ]
    assert all(apply(store, r) for r in records)
    first = _state(store)
    assert first[0] == "answered" and first[2] == {"key": RESULT} and first[3] == [("answered", 2.0)]
    for r in records:
        apply(store, r)
    assert _state(store) == first
    assert store.spend_on(utc_day(time.time()))["analysis"]["calls"] == 1
    store.close()


def test_a_record_an_earlier_release_journalled_is_replayed(tmp_path):
    """A journal written before the vocabulary pass names a paid request's ending ``outcome`` (kind
    ``ledger_outcome``): a daemon upgraded during an outage replays it as the new name."""
    store = Store(tmp_path / "w.db")
    _, request = _taken(store)
    assert encode("ledger_ending", (request, "not_sent"), {}) == {
        "kind": "ledger_ending", "request": request, "ending": "not_sent"
    }
    assert apply(store, {"kind": "ledger_outcome", "request": request, "outcome": "not_sent"})
    assert _state(store)[3] == [("not_sent", 2.0)]
    assert store.spend_on(utc_day(time.time()))["analysis"]["calls"] == 0  # not sent: taken back out of the spend
    store.close()


def test_a_late_answer_replayed_changes_nothing_the_new_holder_owns(tmp_path):
    """An answer journalled by a take that lost the operation meanwhile (its lease ran out, another took it) is
    replayed as late: False, and the new holder's take stands."""
    store = Store(tmp_path / "w.db")
    fence, _ = _taken(store)
    store.gate_recover()  # the first holder's life ended: its take is re-askable
    again = store.gate_take([OP], "node-b:1:1", budget="analysis", seconds=2.0)[0]
    assert again.verdict == "send"
    assert apply(store, encode("gate_release", (OP, "open"), {"fence": fence, "error": "cut"})) is False
    row = store.gate_get(OP)
    assert row is not None and row["holder"] == "node-b:1:1"
    store.close()


def test_a_locked_sqlite_store_pauses_claims_journals_answers_and_replays_them_first(tmp_path):
    """SQLite locked by another process: the answer to a request in flight goes to the journal, claims answer
    nothing, other calls wait (StoreAway), status says since when; once unlocked, the first claim replays
    the journal before it claims."""
    store = Store(tmp_path / "w.db")
    store.register_revision(
        folder="/in", path="/in/a.wav", rel_path="a.wav", size=1, mtime_ns=1, inode=1, jobs=[("analyze", "analyze")]
    )
    fence, request = _taken(store)
    store._db.execute("PRAGMA busy_timeout=50")  # a locked file is found in 50 ms, not 30 s
    guard = OutageGuard(store, Journal(tmp_path / "j"), state_file=tmp_path / OUTAGE_FILE)
    other = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        assert guard.save_result(OP.sha256, OP.service, RESULT, OP, fence) is True
        assert guard.ledger_ending(request, "answered") is None
        assert guard.claim("analyze", "node-a:1:1") is None
        with pytest.raises(StoreAway):
            guard.set_sha256(1, "cd" * 32)
        assert len(guard.journal) == 2
        shown = read_outage(tmp_path)
        assert shown is not None and shown["journalled"] == 2 and "locked" in shown["error"]
        assert "claims paused; 2 answers journalled; retrying in" in shown["next"]
        assert store.gate_get(OP)["state"] == "sending"  # type: ignore[index]
    finally:
        other.execute("ROLLBACK")
        other.close()
    job = wait_for(lambda: guard.claim("analyze", "node-a:1:1"), timeout=10, what="a claim once unlocked")
    assert job is not None and len(guard.journal) == 0 and guard.describe() is None
    row = store.gate_get(OP)
    assert row is not None and row["state"] == "answered"
    assert store.results_for(OP.sha256, OP.service) == {"key": RESULT}
    assert read_outage(tmp_path) is None and not (tmp_path / OUTAGE_FILE).exists()
    guard.close()


def test_what_counts_as_the_store_being_unavailable():
    """Locked, read-only, full and unopenable SQLite files, and PostgreSQL's lost connections and shutdowns count;
    a syntax error or a constraint does not."""
    import psycopg

    def sqlite_error(code: int, text: str) -> sqlite3.OperationalError:
        exc = sqlite3.OperationalError(text)
        exc.sqlite_errorcode = code  # type: ignore[attr-defined]
        return exc

    assert unavailable(sqlite_error(5, "database is locked"))
    assert unavailable(sqlite_error(13, "database or disk is full"))
    assert unavailable(sqlite_error(8 | (1 << 8), "attempt to write a readonly database"))
    assert not unavailable(sqlite_error(1, "near 'SELEC': syntax error"))
    assert not unavailable(sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert unavailable(psycopg.OperationalError("connection refused"))
    assert unavailable(psycopg.errors.AdminShutdown("terminating connection due to administrator command"))
    assert unavailable(psycopg.InterfaceError("the connection is closed"))
    assert not unavailable(psycopg.errors.DeadlockDetected("deadlock detected"))
    assert not unavailable(ValueError("x"))


def test_the_journal_of_an_earlier_life_is_replayed_before_the_first_call(tmp_path):
    """A daemon stopped during an outage left answers in its journal: the next start's first store call replays
    them, whatever that call is."""
    store = Store(tmp_path / "w.db")
    fence, request = _taken(store)
    journal = Journal(tmp_path / "j")
    journal.append(encode("gate_answered", (OP, None), {"fence": fence}))
    journal.append(encode("ledger_ending", (request, "answered"), {}))
    journal.close()
    guard = OutageGuard(store, Journal(tmp_path / "j"))
    assert guard.next_due("analyze") is None
    assert Path(tmp_path / "j").stat().st_size == 0
    assert store.gate_get(OP)["state"] == "answered"  # type: ignore[index]
    guard.close()


def test_while_the_store_is_away_no_call_queues_for_its_thread_and_an_answer_is_kept_at_once(tmp_path):
    """SQLite's one store thread is stuck on a locked file: a paid answer is journalled within its bound anyway,
    a claim answers "nothing" at once and a release is held; once unlocked, the next claim replays the journal and
    the held release first, then claims."""
    import asyncio

    from watcher.store.outage_aio import OutageStore

    store = Store(tmp_path / "w.db")
    store.register_revision(
        folder="/in", path="/in/a.wav", rel_path="a.wav", size=1, mtime_ns=1, inode=1, jobs=[("analyze", "analyze")]
    )
    fence, request = _taken(store)
    claimed = store.claim("analyze", "node-a:1:1")
    assert claimed is not None
    store._db.execute("PRAGMA busy_timeout=2000")  # the store's thread waits 2 s on the lock, then fails
    guard = OutageGuard(store, Journal(tmp_path / "j"), answer_seconds=0.2)
    aio = OutageStore(guard)
    other = sqlite3.connect(tmp_path / "w.db", isolation_level=None)

    async def scenario() -> None:
        other.execute("BEGIN EXCLUSIVE")
        stuck = asyncio.ensure_future(aio.set_sha256(1, "cd" * 32))  # takes the store's one thread
        await asyncio.sleep(0.05)  # sleep-ok: lets the stuck call reach the thread first
        started = time.monotonic()
        assert await aio.save_result(OP.sha256, OP.service, RESULT, OP, fence) is True
        assert time.monotonic() - started < 1.5 and len(guard.journal) >= 1
        started = time.monotonic()
        assert await aio.claim("analyze", "node-a:1:1") is None
        await aio.release(claimed, next_attempt_at=0.0)
        await aio.ledger_ending(request, "answered")
        assert time.monotonic() - started < 0.5  # none of them waited for the store's thread
        other.execute("ROLLBACK")
        await stuck  # it got the lock once it was given back: it only waited
        deadline = time.monotonic() + 10
        job = None
        while job is None and time.monotonic() < deadline:
            job = await aio.claim("analyze", "node-b:1:1")
            await asyncio.sleep(0.1)  # sleep-ok: the pace of a claimer's polls
        assert job is not None and job.id == claimed.id and job.holder == "node-b:1:1"
        await aio.aclose()

    try:
        asyncio.run(scenario())
    finally:
        other.close()
    store_state = Store(tmp_path / "w.db")
    row = store_state.gate_get(OP)
    assert row is not None and row["state"] == "answered"
    assert store_state.results_for(OP.sha256, OP.service) == {"key": RESULT}
    assert Journal(tmp_path / "j").records() == []
    store_state.close()


def test_status_says_since_when_the_store_is_unreachable_without_asking_it(tmp_path):
    """While the running daemon says its store is away, `watcher status` (and its JSON, which the page reads)
    report since when and what the daemon does next, without waiting on the store; a file left by a dead daemon is
    not believed. A store that does not answer the command itself is reported the same way."""
    from tests.conftest import make_settings
    from watcher import commands
    from watcher.fsutil import write_json_atomic
    from watcher.status import render

    settings = make_settings(tmp_path, tmp_path / "in", "http://127.0.0.1:9")
    settings.state_dir.mkdir(parents=True)
    Store(settings.state_dir / "watcher.db").close()
    said = {"unreachable_since": "2026-12-07T21:00:00Z", "error": "connection refused", "journalled": 3}
    said["next"] = "claims paused; 3 answers journalled; retrying in 5 s"
    write_json_atomic(settings.state_dir / OUTAGE_FILE, said | {"pid": os.getpid()})
    report = commands.status(settings)
    assert report["store_unreachable"] == said and report["files"] == [] and report["counts"] == {}
    text = render(report)
    assert "store unreachable since 2026-12-07T21:00:00Z (connection refused): claims paused; 3 answers" in text
    assert "no files recorded yet" not in text
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_json_atomic(settings.state_dir / OUTAGE_FILE, said | {"pid": int(dead.stdout)})
    assert commands.status(settings)["store_unreachable"] is None  # the SQLite store answers for itself
    pg = settings.model_copy(
        update={"store": settings.store.model_copy(update={"url": "postgresql://x@127.0.0.1:9/w"})}
    )
    shown = commands.status(pg)["store_unreachable"]
    assert shown is not None and "127.0.0.1" in shown["error"] and shown["unreachable_since"]
