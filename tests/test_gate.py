"""The gate every paid call passes, and its ledger: the store's contract, tried against every adapter.

Each test plays two claimers (two jobs, or two daemons sharing a store) against one operation.
"""

from __future__ import annotations

import threading
import time

import pytest

from watcher.store import Operation, Store, utc_day
from watcher.store.rules import CRASH_REASKS

SHA = "ab" * 32
UPLOAD = Operation(SHA, "processing http://x account:1", "upload", "p1", "reask")
MASTER = Operation(SHA, "processing http://x account:1", "master", "p2", "hold")
KEY = Operation(SHA, "analysis http://y account:2", "analyze:key", "", "reask")


def take(store: Store, op: Operation, holder: str, **kw):
    kw.setdefault("budget", "processing")
    kw.setdefault("seconds", 10.0)
    return store.gate_take([op], holder, **kw)[0]


def test_second_taker_waits_then_reads_the_answer(store):
    """While one job sends, another is told to wait; once answered, it gets the ID and sends nothing."""
    first = take(store, MASTER, "a")
    assert first.verdict == "send" and not first.resend
    assert take(store, MASTER, "b").verdict == "wait"
    assert store.gate_answered(MASTER, "m-1", fence=first.fence)
    again = take(store, MASTER, "b")
    assert (again.verdict, again.result) == ("answered", "m-1")
    assert store.gate_get(MASTER)["sends"] == 1


def test_one_winner_among_racing_threads(store):
    """Twenty threads take the same operation at once: exactly one may send."""
    verdicts: list[str] = []
    barrier = threading.Barrier(20)

    def race(n: int) -> None:
        barrier.wait()
        verdicts.append(take(store, MASTER, f"t{n}").verdict)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(verdicts) == ["send"] + ["wait"] * 19


def test_lost_answer_is_held_until_the_user_says_resend(store):
    """In doubt: no one sends it again, not even the same job, until `retry` turns it into a counted re-send."""
    first = take(store, MASTER, "a")
    store.gate_release(MASTER, "in_doubt", fence=first.fence, error="read timeout")
    held = take(store, MASTER, "b")
    assert held.verdict == "in_doubt" and held.since is not None and held.error == "read timeout"
    assert store.gate_resend([(SHA, MASTER.service, "master", "p2")]) == 1
    resent = take(store, MASTER, "b")
    assert resent.verdict == "send" and resent.resend
    assert store.gate_get(MASTER)["sends"] == 2


def test_resend_policy_takes_in_doubt_operations(store):
    """With in_doubt = "resend" the next take sends it again, flagged as a possible duplicate."""
    first = take(store, MASTER, "a")
    store.gate_release(MASTER, "in_doubt", fence=first.fence)
    ticket = take(store, MASTER, "b", resend_in_doubt=True)
    assert ticket.verdict == "send" and ticket.resend


def test_not_sent_is_free_to_send_and_not_spent(store):
    """Provably not sent: the next take sends without calling it a re-send, and the day's spend is given back."""
    first = take(store, UPLOAD, "a")
    store.gate_release(UPLOAD, "open", fence=first.fence, error="connect refused")
    store.ledger_ending(first.request, "not_sent")
    assert store.spend_on(utc_day(time.time()))["processing"]["seconds"] == 0
    again = take(store, UPLOAD, "b")
    assert again.verdict == "send" and not again.resend


def test_a_crash_leaves_the_intent_and_the_restart_treats_it_as_in_doubt(store):
    """An operation left `sending` (its daemon killed) is in doubt after recovery, or re-asked when it may be."""
    take(store, MASTER, "dead")
    store.gate_take([KEY], "dead", budget="analysis", seconds=5)
    assert store.gate_recover() == 2
    assert take(store, MASTER, "alive").verdict == "in_doubt"
    reask = store.gate_take([KEY], "alive", budget="analysis", seconds=5)[0]
    assert reask.verdict == "send" and reask.resend


@pytest.mark.parametrize("death", ["recovery at restart", "lease expired", "the node's next life"])
def test_a_request_whose_sender_dies_again_and_again_is_held_after_two_reasks(store, death):
    """A crash loop on one file: the re-askable request is asked again CRASH_REASKS times, then held in doubt
    (every way a sender's death is found: a restart's recovery, another taker finding its lease expired, the same
    node starting again and giving back what its earlier lives held)."""
    for n in range(CRASH_REASKS + 1):
        ticket = store.gate_take([KEY], f"runner:{n}@node1", budget="analysis", seconds=5, lease=-1)[0]
        assert ticket.verdict == "send" and ticket.resend == (n > 0)
        if death == "recovery at restart":
            assert store.gate_recover() == 1
        elif death == "the node's next life":
            assert store.release_node("node1", f"runner:{n + 1}@node1")[1] == 1
    held = store.gate_take([KEY], "next", budget="analysis", seconds=5)[0]
    assert held.verdict == "in_doubt" and f"{CRASH_REASKS + 1} times" in (held.error or "")
    again = store.gate_take([KEY], "user", budget="analysis", seconds=5, resend_in_doubt=True)[0]
    assert again.verdict == "send" and again.resend  # `watcher retry` asks again


def test_an_expired_lease_is_in_doubt_for_the_next_taker(store):
    """A sender whose lease ran out (its node died) leaves the operation in doubt, not free to send."""
    take(store, MASTER, "dead", lease=-1)
    assert take(store, MASTER, "other").verdict == "in_doubt"


def test_the_daily_cap_is_never_passed(store):
    """A request that would pass the cap is not taken; the first refusal of the day says so once."""
    caps = {"budget": "analysis", "cap_seconds": 25.0}
    ops = [Operation(f"{n:064x}", KEY.service, "analyze:key", "", "reask") for n in range(4)]
    verdicts = [store.gate_take([op], "a", seconds=10.0, **caps)[0] for op in ops]
    assert [t.verdict for t in verdicts] == ["send", "send", "capped", "capped"]
    assert [t.first_cap for t in verdicts[2:]] == [True, False]
    assert verdicts[2].until is not None and verdicts[2].spent_seconds == 20.0
    day = store.spend_on(utc_day(time.time()))["analysis"]
    assert day["seconds"] == 20.0 and day["calls"] == 2 and day["capped_at"] is not None


def test_one_request_for_several_models_is_one_ledger_line(store):
    """A stream for three models charges the file's seconds once and records the model count."""
    ops = [Operation(SHA, KEY.service, f"analyze:{m}", "", "reask") for m in ("key", "bpm", "loud")]
    tickets = store.gate_take(ops, "a", budget="analysis", seconds=12.5)
    assert {t.request for t in tickets} == {tickets[0].request}
    day = store.spend_on(utc_day(time.time()))["analysis"]
    assert (day["seconds"], day["calls"]) == (12.5, 1)


def test_endpoint_and_account_are_part_of_the_key(store):
    """The same content and operation on another endpoint or account is a different operation."""
    first = take(store, MASTER, "a")
    store.gate_answered(MASTER, "m-1", fence=first.fence)
    elsewhere = Operation(SHA, "processing http://other account:1", "master", "p2", "hold")
    other_account = Operation(SHA, "processing http://x account:9", "master", "p2", "hold")
    assert take(store, elsewhere, "a").verdict == "send"
    assert take(store, other_account, "a").verdict == "send"


def test_superseded_jobs_cannot_commit_or_release(store):
    """A job whose file got a newer revision can neither commit nor release: its late result is dropped."""
    from watcher.store import LeaseLost

    args = {"folder": "/in", "path": "/in/a.wav", "rel_path": "a.wav", "jobs": [("analyze", "analyze")]}
    store.register_revision(size=1, mtime_ns=1, inode=1, **args)
    job = store.claim("analyze", "a")
    assert store.is_live(job)
    store.register_revision(size=2, mtime_ns=2, inode=1, **args)
    assert not store.is_live(job)
    with pytest.raises(LeaseLost):
        store.commit(job, sidecar="/in/a.wav.analysis.json")
    with pytest.raises(LeaseLost):
        store.release(job, state="done")
    newest = store.claim("analyze", "b")
    assert newest is not None and newest.file.size == 2 and newest.step == "analyze" and newest.state == "pending"


def test_names_that_are_not_utf8_round_trip(store):
    """A Latin-1 name from an old share is stored, found and handed back byte for byte."""
    import os

    path = os.fsdecode(b"/in/caf\xe9.wav")
    store.register_revision(folder="/in", path=path, rel_path=path[4:], size=1, mtime_ns=1, inode=1, jobs=[("a", "p")])
    assert store.known_revision(path, 1, 1, 1)
    job = store.claim("a", "x")
    assert os.fsencode(job.file.path) == b"/in/caf\xe9.wav"
    assert store.current_revision(path).id == job.file.id


def test_retention_forgets_old_replaced_revisions_but_keeps_paid_work(store):
    """Replaced revisions older than the retention are forgotten; the current one and the gate's rows stay."""
    args = {"folder": "/in", "path": "/in/a.wav", "rel_path": "a.wav", "jobs": [("analyze", "analyze")]}
    store.register_revision(size=1, mtime_ns=1, inode=1, now=0.0, **args)
    store.register_revision(size=2, mtime_ns=2, inode=1, **args)
    first = take(store, MASTER, "a")
    store.gate_answered(MASTER, "m-1", fence=first.fence)
    assert store.prune(90) == 0  # replaced just now: kept for the retention period
    assert store.prune(90, now=time.time() + 91 * 86400) == 1
    assert store.current_revision("/in/a.wav").size == 2
    assert store.gate_get(MASTER)["result"] == "m-1"


def test_a_refused_request_is_recorded_and_not_spent(store):
    """A request the service refused (401, 422) is a `refused` line: taken back out of the day's seconds and
    paid calls, once, and its operation is free again."""
    first = take(store, MASTER, "a", seconds=12.0)
    store.gate_release(MASTER, "open", fence=first.fence, error="HTTP 401")
    store.ledger_ending(first.request, "refused")
    store.ledger_ending(first.request, "refused")
    day = store.spend_on(utc_day(time.time()))["processing"]
    assert (day["seconds"], day["calls"]) == (0, 0)
    (line,) = store.ledger_lines(utc_day(time.time()), utc_day(time.time()))
    assert (line["outcome"], line["kind"], line["estimated"]) == ("refused", "first", False)
    assert take(store, MASTER, "b").verdict == "send"


def test_an_estimated_charge_settles_to_the_real_length(store):
    """A take of unknown length is charged its upper bound, marked estimated; settling the content sets every
    such line, and the day's spend, to the real seconds."""
    today = utc_day(time.time())
    line = take(store, KEY, "a", budget="analysis", seconds=30.0, estimated=True)
    store.ledger_ending(line.request, "answered")
    assert store.spend_on(today)["analysis"]["seconds"] == 30.0
    assert store.ledger_settle(SHA, 12.5) == 1
    assert store.spend_on(today)["analysis"]["seconds"] == 12.5
    (settled,) = store.ledger_lines(today, today)
    assert (settled["seconds"], settled["estimated"]) == (12.5, False)
    assert store.ledger_settle(SHA, 99.0) == 0  # settled once: a later length does not move it


def test_a_take_of_an_in_doubt_operation_is_a_reported_resend(store):
    """Sent again after the user's word, a held operation's take is a `resend` line; a re-asked model's a `reask`."""
    held = take(store, MASTER, "a")
    store.gate_release(MASTER, "in_doubt", fence=held.fence, error="lost")
    store.gate_resend([(MASTER.sha256, MASTER.service, MASTER.name, MASTER.params)])
    assert take(store, MASTER, "b").resend
    cut = take(store, KEY, "a", budget="analysis")
    store.gate_release(KEY, "reask", fence=cut.fence, error="stream cut")
    take(store, KEY, "b", budget="analysis")
    kinds = [line["kind"] for line in store.ledger_lines(utc_day(time.time()), utc_day(time.time()))]
    assert kinds == ["first", "resend", "first", "reask"]


def test_an_adopted_id_answers_an_operation_the_gate_never_took(store):
    """An ID taken back from a verified record on disk answers the operation with no ledger line and no spend; the
    gate's own record of an operation always wins over one from disk."""
    assert store.gate_adopt(MASTER, "m-from-disk")
    row = store.gate_get(MASTER)
    assert (row["state"], row["result"], row["remote_state"]) == ("answered", "m-from-disk", "requested")
    assert (take(store, MASTER, "a").verdict, take(store, MASTER, "a").result) == ("answered", "m-from-disk")
    day = utc_day(time.time())
    assert store.ledger_lines(day, day) == [] and store.spend_on(day) == {}
    assert not store.gate_adopt(MASTER, "m-other")
    sent = take(store, UPLOAD, "a")
    assert store.gate_answered(UPLOAD, "u-1", fence=sent.fence)
    assert not store.gate_adopt(UPLOAD, "u-from-disk")
    assert store.gate_get(UPLOAD)["result"] == "u-1" and store.gate_get(MASTER)["result"] == "m-from-disk"
