"""Paid once, proven by the bill: the gate owns the wire, and the emulator's bill equals watcher's ledger.

Each scenario is a finding reproduced against the emulator with faults, through real HTTP: a stream re-sent below
the gate (1), an unreadable answer recorded as "not sent" (2), a file of unknown length charged 0 s (6), another
model's answer stored as the asked one (7), refused calls counted as spend (11). The autouse oracle in conftest
holds every bill against the ledger too; these tests say in figures what it checks.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, make_settings, wait_for, write_tone
from tests.test_archive import PKEY, archive_settings
from tests.test_doctor import doctor
from tests.test_paid_once import cli, sidecar_doc, status
from tests.test_scopes import problem
from watcher.config import RetryConfig
from watcher.emulator import Emulator
from watcher.emulator.server import KEY_CHECK
from watcher.sending import NoTicket, WireTicket, issue
from watcher.services.analysis import STREAM_PATH, AnalysisClient
from watcher.services.http import HttpPolicy

pytestmark = pytest.mark.timeout(90)
FAST = RetryConfig(backoff_initial=0.1, backoff_max=0.3, max_attempts=6, needs_user_backoff=60)
STREAM = f"POST {STREAM_PATH}"


@pytest.fixture
def emu():
    with Emulator(analysis_key=API_KEY, processing_key=PKEY, use_local=False) as e:
        e.processing.faults.polls_needed = 0
        yield e


def ledger(tmp_path: Path, where: str = "1=1") -> list[dict[str, Any]]:
    """The ledger lines of the test's store."""
    path = tmp_path / "state" / "watcher.db"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(f"SELECT * FROM ledger WHERE {where} ORDER BY id")]
    except sqlite3.OperationalError:
        return []  # the schema is still being made
    finally:
        db.close()


def settled(tmp_path: Path) -> bool:
    """No ledger line is still in flight."""
    lines = ledger(tmp_path)
    return bool(lines) and all(line["outcome"] != "sending" for line in lines)


# -- the wire guard ------------------------------------------------------------------------------------------------


@pytest.mark.bill_exempt("the one request sent goes on a hand-made ticket, as a gate would issue it: no ledger")
def test_a_paid_request_without_a_fresh_ticket_never_leaves(emu, tmp_path):
    """No ticket, a used ticket (a re-send) or a ticket for other models: refused before a byte is sent; the
    service sees exactly the one request its ticket covered."""
    audio = write_tone(tmp_path / "a.wav", 0.2)
    from tests.conftest import body

    async def go() -> list[str]:
        client = AnalysisClient(emu.url, API_KEY, policy=HttpPolicy(attempts=1))
        refused: list[str] = []
        try:
            for ticket in (None, WireTicket(1, ("analyze:key",)), "again", WireTicket(2, ("analyze:bpm_degara",))):
                if isinstance(ticket, WireTicket):
                    issue(ticket)
                try:
                    await client.analyze(body(audio), ["key"], lambda r: None)
                except NoTicket as exc:
                    refused.append(str(exc))
        finally:
            await client.aclose()
        return refused

    refused = asyncio.run(go())
    assert len(refused) == 3
    assert "without a ticket" in refused[0] and "sent again" in refused[1] and "covers" in refused[2]
    assert emu.api.counts()[STREAM] == 1 and len(emu.bill()) == 1


def test_the_doctor_key_check_is_a_probe_that_bills_nothing(tmp_path, emu, inbox):
    """`watcher doctor` sends the one unpaid request a paid endpoint gets (no audio, no model): it passes the
    guard as a probe, reaches the service, and the bill stays empty."""
    proc = doctor(tmp_path, emu, processing_key=PKEY, folders=[inbox])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert emu.api.counts()[STREAM + KEY_CHECK] == 1 and emu.api.counts()[STREAM] == 0
    assert emu.bill() == []


# -- finding 1: a stream re-sent below the gate ---------------------------------------------------------------------


def test_a_cut_stream_is_re_asked_only_through_a_new_take_within_the_cap(tmp_path, inbox, emu, run_daemon):
    """Cap 2.5 s, three 1-s files, the first stream cut after one model. Before: the client re-sent it below the
    gate, so the service billed 3 streams and 3.0 s (past the cap) while the store recorded 2 calls and 2.0 s.
    Now every stream is a take: the bill and the ledger agree, the re-ask is a `reask` line, and the cap holds."""
    emu.analysis.faults.drop_after = 1
    settings = make_settings(tmp_path, inbox, emu.url, daily_audio_minutes=2.5 / 60)
    d = run_daemon(settings.model_copy(update={"retry": FAST}))
    for n in range(3):
        write_tone(inbox / f"{n}.wav", 1.0, freq=300 + 100 * n)
    wait_for(
        lambda: status(tmp_path)["spend"]["analysis"]["capped_at"] and settled(tmp_path), what="the cap reached"
    )
    d.stop()
    bill = emu.bill()
    paid = [line for line in ledger(tmp_path) if line["outcome"] not in ("not_sent", "refused")]
    assert len(bill) == len(paid) == 2
    billed = sum(c.seconds or 0 for c in bill)
    assert billed == pytest.approx(sum(line["seconds"] for line in paid))
    assert billed <= 2.5
    assert sum(len(c.operations) for c in bill) == sum(line["models"] for line in paid)


def test_a_re_ask_after_a_cut_stream_is_a_reported_take(tmp_path, inbox, emu, run_daemon):
    """One file, its stream cut after one model: two streams billed, two ledger lines, the second a `reask` of the
    two models still missing; every model is billed exactly as the ledger says."""
    emu.analysis.faults.drop_after = 1
    d = run_daemon(make_settings(tmp_path, inbox, emu.url).model_copy(update={"retry": FAST}))
    audio = write_tone(inbox / "a.wav", 1.0)
    wait_for(lambda: sidecar_doc(audio).get("complete"), what="the sidecar")
    d.stop()
    lines = ledger(tmp_path)
    assert [(line["kind"], line["models"], line["outcome"]) for line in lines] == [
        ("first", 3, "partial"),
        ("reask", 2, "answered"),
    ]
    assert [len(c.operations) for c in emu.bill()] == [3, 2]


# -- finding 2: an answer that cannot be read is in doubt, never "not sent" ----------------------------------------


@pytest.mark.parametrize("fault", ["done_without_id", "done_then_303"])
def test_a_done_request_whose_answer_cannot_be_read_is_held_not_paid_again(tmp_path, inbox, emu, run_daemon, fault):
    """The mastering is done (and billed) but its answer is a 200 without the ID, or a 303. Before: "not sent",
    so it was sent and billed 3 times while the ledger said not_sent 3 times. Now: held in doubt after one request,
    billed once, the ledger line in doubt."""
    setattr(emu.processing.faults, fault, {"POST /master-audio": 100})
    settings = archive_settings(tmp_path, inbox, emu, versions=("original", "mastered"))
    d = run_daemon(settings.model_copy(update={"retry": FAST}))
    write_tone(inbox / "x.wav", 0.3)
    held = wait_for(lambda: problem(tmp_path, "x.wav", "archive", "in_doubt"), what="the mastering held")
    d.stop()
    assert held["step"] == "process"
    assert emu.api.counts()["POST /master-audio"] == 1
    assert [c.operations for c in emu.bill() if c.service == "processing"] == [("upload",), ("master",)]
    assert [line["outcome"] for line in ledger(tmp_path, "operation='master'")] == ["in_doubt"]
    today = dt.datetime.now(dt.UTC).date().isoformat()
    summary = cli(tmp_path, "spend", "--from", today, "--to", today).stdout
    assert "processing: 1 paid request(s)" in summary and "1 in doubt (may be billed" in summary, summary


# -- finding 6: unknown duration is never free ---------------------------------------------------------------------


def headerless_mp3(path: Path, size: int = 2000) -> Path:
    """An MP3 by its first bytes (an ID3 tag) whose headers give no duration."""
    path.write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x00" + os.urandom(size - 10))
    return path


def test_files_of_unknown_length_are_charged_an_upper_bound_against_the_cap(tmp_path, inbox, emu, run_daemon):
    """Four 2000-byte MP3s whose headers give no duration, a 1-s cap. Before: each charged 0 s, all four sent,
    spend 0. Now: each is charged its size at 32 kbit/s (0.5 s), marked estimated; two pass, the cap stops the
    rest, and the bill has exactly the two requests the ledger has."""
    d = run_daemon(make_settings(tmp_path, inbox, emu.url, daily_audio_minutes=1 / 60))
    for n in range(4):
        headerless_mp3(inbox / f"{n}.mp3")
    wait_for(
        lambda: status(tmp_path)["spend"]["analysis"]["capped_at"] and settled(tmp_path), what="the cap reached"
    )
    d.stop()
    lines = ledger(tmp_path)
    assert [(line["seconds"], line["estimated"]) for line in lines] == [(0.5, 1), (0.5, 1)]
    assert len(emu.bill()) == 2
    assert status(tmp_path)["spend"]["analysis"]["seconds_today"] == 1.0


def test_the_dry_run_says_a_length_is_estimated(tmp_path, inbox, emu):
    """`watcher scan --dry-run` shows the upper bound a file of unknown length would be charged, and says so."""
    headerless_mp3(inbox / "x.mp3", 4000)
    done = cli(tmp_path, "scan", "--dry-run", str(inbox), analysis__base_url=emu.url)
    assert done.returncode == 0, done.stderr
    assert "estimated" in done.stdout and "1.0 s" in done.stdout
    assert emu.api.requests == []


# -- finding 7: exact model matching -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "answered"),
    [
        ("mood_happy-discogs-effnet-1", "mood_sad-discogs-effnet-1"),
        ("genre_discogs400-discogs-effnet-1", "genre_discogs400-discogs-effnet-2"),
    ],
)
def test_another_models_answer_is_never_stored_as_the_asked_one(tmp_path, inbox, emu, run_daemon, asked, answered):
    """The service answers one asked model's slot with another model's name. Before: matched by likeness (difflib,
    0.85) and stored as the asked one, for good. Now: it goes to the sidecar's errors, the asked model is re-asked
    through new takes (``reask`` lines) and never filled with another model's answer."""
    emu.analysis.faults.answer_as = {asked: answered}
    settings = make_settings(tmp_path, inbox, emu.url, models=["key", asked])
    retry = RetryConfig(backoff_initial=0.1, backoff_max=0.2, max_attempts=3, needs_user_backoff=60)
    d = run_daemon(settings.model_copy(update={"retry": retry}))
    audio = write_tone(inbox / "a.wav", 0.3)
    doc = wait_for(lambda: problem(tmp_path, "a.wav", "analyze") and sidecar_doc(audio), what="the file failing")
    d.stop()
    assert [m["requested"] for m in doc["models"].values()] == ["key"]
    assert doc["complete"] is False
    assert any(answered in (e["message"] or "") for e in doc["errors"])
    kinds = [line["kind"] for line in ledger(tmp_path)]
    assert kinds[0] == "first" and set(kinds[1:]) == {"reask"}


# -- finding 11: refused calls are not spend -----------------------------------------------------------------------


def test_refused_calls_are_recorded_as_refused_and_cost_nothing(tmp_path, inbox, emu, run_daemon):
    """A key revoked after the start's key check passed: the 401 pauses the service. Before: it showed as a paid
    call (and its seconds) today. Now: the ledger line is `refused`, today's spend has no paid call and no second,
    and the bill is empty. (A key wrong from the start is held by that check before any paid call: test_control.)"""
    d = run_daemon(make_settings(tmp_path, inbox, emu.url))
    # the check counted is not yet answered: the key may change only once the daemon has its answer
    wait_for(lambda: d.daemon._key_check is not None and d.daemon._key_check.done(), what="the start's key check")
    assert emu.api.counts()[STREAM + KEY_CHECK] == 1 and not d.daemon.held_services
    emu.analysis.api_key = "revoked-since-000"  # the account's key is revoked while the daemon runs
    write_tone(inbox / "a.wav", 0.5)
    wait_for(lambda: settled(tmp_path), what="the refused request")
    d.stop()
    assert [line["outcome"] for line in ledger(tmp_path)] == ["refused"]
    spend = status(tmp_path)["spend"]["analysis"]
    assert spend["paid_calls_today"] == 0 and spend["seconds_today"] == 0
    assert emu.api.counts()[STREAM] == 1 and emu.bill() == []


# -- the ledger of a billing period ----------------------------------------------------------------------------------


def test_watcher_spend_exports_the_period_to_hold_against_the_invoice(tmp_path, inbox, emu, run_daemon):
    """`watcher spend --from --to --csv`: one row per request, paid or not, with its seconds; the paid rows are
    exactly what the bill holds."""
    emu.analysis.faults.status_429 = 1
    emu.analysis.faults.retry_after = 0.1
    d = run_daemon(make_settings(tmp_path, inbox, emu.url).model_copy(update={"retry": FAST}))
    audio = write_tone(inbox / "a.wav", 1.0)
    wait_for(lambda: sidecar_doc(audio).get("complete"), what="the sidecar")
    d.stop()
    today = dt.datetime.now(dt.UTC).date().isoformat()
    done = cli(tmp_path, "spend", "--from", today, "--to", today, "--csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [(r["ending"], r["paid"]) for r in rows] == [("not_sent", "no"), ("answered", "yes")]
    # budget and ending are appended; service and outcome keep their places until 0.4.0 (deprecated)
    assert done.stdout.splitlines()[0].endswith(",kind,outcome,paid,budget,ending")
    assert all((r["budget"], r["ending"]) == (r["service"], r["outcome"]) == ("analysis", r["ending"]) for r in rows)
    paid = [r for r in rows if r["paid"] == "yes"]
    assert [float(r["seconds"]) for r in paid] == [c.seconds for c in emu.bill()]
    assert [r["account"] for r in paid] == [c.account.removeprefix("account:") for c in emu.bill()]  # per invoice
    assert API_KEY not in done.stdout
    summary = cli(tmp_path, "spend", "--from", today, "--to", today)
    assert "1 paid request(s), 0.02 audio minutes" in summary.stdout and "1 not paid" in summary.stdout
    bad = cli(tmp_path, "spend", "--from", "yesterday", "--to", today)
    assert bad.returncode == 2 and "'yesterday' is not a date" in bad.stderr
    assert json.loads(json.dumps(rows))  # plain text all the way
