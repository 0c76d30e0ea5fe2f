"""A model-based test of the paid-call gate: Hypothesis drives takers, answers, lost answers, late endings,
crashes, lease expiry, clock steps, a daily cap and copies against each store (PostgreSQL real), and checks after
every step what the money depends on:

- an operation is sent more than once only where each extra send was recorded (a re-send ticket, or a release
  that proved the earlier one was not sent), and never by two holders at once;
- the day's cap is never passed;
- no operation or job is stuck: once every lease has run out, every operation can be decided by a new taker and
  every unfinished job claimed; a job's release by a claimer that lost it is refused (LeaseLost);
- the ledger's lines add up to the spend rows, day by day (a line not sent is not spent).

The CI profile keeps it under a minute; ``GATE_MODEL_PROFILE=long`` runs the long one, ``GATE_MODEL_EXAMPLES=N``
sets the examples per store (see bench/README.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from tests.test_fence import _LostAcks
from watcher.store import Fence, Job, LeaseLost, Operation, Store, Ticket
from watcher.store.postgres import PostgresStore

settings.register_profile(
    "ci", max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.register_profile(
    "long", max_examples=2000, stateful_step_count=80, deadline=None, suppress_health_check=list(HealthCheck)
)
PROFILE_NAME = os.environ.get("GATE_MODEL_PROFILE", "ci")
PROFILE = settings.get_profile(PROFILE_NAME)
if os.environ.get("GATE_MODEL_EXAMPLES"):  # a bench may choose how many examples per store
    PROFILE = settings(PROFILE, max_examples=int(os.environ["GATE_MODEL_EXAMPLES"]))
pytestmark = pytest.mark.timeout(3600 if PROFILE_NAME == "long" else 120)

SHA = "9a" * 32
SERVICE = "processing http://x account:1"
OPS = [
    Operation(SHA, SERVICE, "upload", "p", "reask"),
    Operation(SHA, SERVICE, "master", "m", "hold"),
    Operation("8b" * 32, SERVICE, "upload", "p", "reask"),
]
TAKERS = [f"node{n}:1:1@{n:016x}" for n in range(2)]
LEASE = 600.0
CAP = 60.0
SECONDS = 10.0
JOBS = 2


@dataclass
class Sent:
    """A request a taker sent and has not told the ending of yet."""

    taker: str
    op: Operation
    ticket: Ticket


class GateModel(RuleBasedStateMachine):
    """The gate against a model of what was sent, recorded and spent."""

    open_store: Callable[[Callable[[], float]], Any]  # set by the test: a fresh, empty store of one adapter

    def __init__(self) -> None:
        super().__init__()
        self.step = 0.0  # the node's clock minus the true time (a stepped clock)
        self.now = time.time()  # the database's clock, as the model advances it
        self.store = type(self).open_store(lambda: time.time() + self.step)
        self.sent: list[Sent] = []
        self.recorded = dict.fromkeys(OPS, 0)  # re-send tickets and proven not-sent releases per operation
        self.sends = dict.fromkeys(OPS, 0)
        self.holder: dict[Operation, tuple[Fence, float]] = {}  # the take holding each operation, and its lease end
        self.ids = 0
        self.claimed: list[tuple[Job, float]] = []  # jobs claimed and not given back, with their lease end
        self.done: set[int] = set()
        self.latest: dict[int, int | None] = {}  # each job's latest claim
        for n in range(JOBS):
            self.store.register_revision(
                folder="/in", path=f"/in/{n}.wav", rel_path=f"{n}.wav", size=1, mtime_ns=1, inode=n,
                jobs=[("archive", "upload")], now=self.now - 1,
            )  # fmt: skip

    def teardown(self) -> None:
        self.no_operation_is_stuck()
        self.store.close()

    # -- what happens ------------------------------------------------------------------------------------------

    @rule(taker=st.sampled_from(TAKERS), which=st.lists(st.sampled_from(OPS), min_size=1, max_size=2, unique=True),
          resend=st.booleans(), lost_ack=st.booleans())  # fmt: skip
    def take(self, taker: str, which: list[Operation], resend: bool, lost_ack: bool) -> None:
        """A job (or a copy of the same content elsewhere) takes one request's operations."""
        if lost_ack and isinstance(self.store, _LostAcks):
            self.store.lose = 1
        tickets = self.store.gate_take(
            which, taker, budget="processing", seconds=SECONDS, cap_seconds=CAP, lease=LEASE,
            resend_in_doubt=resend, now=self.now,
        )  # fmt: skip
        for op in which:  # a take that finds a lease run out ends that holder's hold (the operation is in doubt)
            if op in self.holder and self.holder[op][1] < self.now:
                del self.holder[op]
        for op, ticket in zip(which, tickets, strict=True):
            if ticket.verdict == "send":
                assert op not in self.holder, f"{op.name} taken while {self.holder[op][0]} holds it"
                assert ticket.fence is not None
                self.holder[op] = (ticket.fence, self.now + LEASE)
                self.sends[op] += 1
                self.recorded[op] += ticket.resend
                self.sent.append(Sent(taker, op, ticket))

    def _finish(self, index: int, ending: str) -> None:
        """One request ends (every operation it carried): each ending names its take's fence, as PaidCalls does."""
        request = self.sent[index % len(self.sent)].ticket.request
        assert request is not None
        done = [f for f in self.sent if f.ticket.request == request]
        self.sent = [f for f in self.sent if f.ticket.request != request]
        late = False
        for f in done:
            op, fence = f.op, f.ticket.fence
            assert fence is not None
            holds = op in self.holder and self.holder[op][0] == fence
            if ending == "answered":
                self.ids += 1
                fenced = self.store.gate_answered(op, f"id-{self.ids}", fence=fence)
            elif ending == "not_sent":
                fenced = self.store.gate_release(op, "open", fence=fence, error="refused")
                self.recorded[op] += fenced
            else:
                state = "in_doubt" if op.on_doubt == "hold" else "reask"
                fenced = self.store.gate_release(op, state, fence=fence, error="read timeout")
            assert fenced == holds, f"an ending of {fence} for {op.name} was {'taken' if fenced else 'refused'}"
            if holds:
                del self.holder[op]
            late |= not fenced
        self.store.ledger_ending(request, "late" if late and ending != "not_sent" else ending)

    @precondition(lambda self: self.sent)
    @rule(index=st.integers(0, 9))
    def answered(self, index: int) -> None:
        """The service answered (maybe after the taker's lease ran out: late)."""
        self._finish(index, "answered")

    @precondition(lambda self: self.sent)
    @rule(index=st.integers(0, 9))
    def answer_lost(self, index: int) -> None:
        """The whole request was sent and its answer lost."""
        self._finish(index, "in_doubt")

    @precondition(lambda self: self.sent)
    @rule(index=st.integers(0, 9))
    def not_sent(self, index: int) -> None:
        """The request provably never left (refused before a byte was sent)."""
        self._finish(index, "not_sent")

    @rule(taker=st.sampled_from(TAKERS))
    def claim(self, taker: str) -> None:
        """A worker claims a due job (one whose lease ran out is due again)."""
        job = self.store.claim("archive", taker, lease=LEASE, now=self.now)
        if job is not None:
            assert job.id not in self.done
            held = [(j, end) for j, end in self.claimed if j.id == job.id]
            assert all(end < self.now for _, end in held), f"job {job.id} claimed while its lease runs"
            self.claimed.append((job, self.now + LEASE))
            assert job.claim is not None and job.claim > (self.latest.get(job.id) or 0)
            self.latest[job.id] = job.claim

    @precondition(lambda self: self.claimed)
    @rule(index=st.integers(0, 9), finished=st.booleans())
    def give_back(self, index: int, finished: bool) -> None:
        """A claimer ends its job (done) or schedules it again; refused when another claimer took it since."""
        job, _ = self.claimed.pop(index % len(self.claimed))
        taken_over = self.latest[job.id] != job.claim
        try:
            self.store.release(job, state="done" if finished else "pending")
        except LeaseLost:
            assert taken_over, f"job {job.id} refused to the claimer that still held it"
            return
        assert not taken_over, f"job {job.id} given back by a claimer that lost it"
        self.latest[job.id] = None  # given back: no claim holds it
        if finished:
            self.done.add(job.id)

    @rule(taker=st.sampled_from(TAKERS))
    def crash(self, taker: str) -> None:
        """A taker's process dies; its next life recovers what it held (its endings never come)."""
        self.sent = [f for f in self.sent if f.taker != taker]
        self.store.gate_recover(taker)
        self.store.release_leases(taker)
        self.claimed = [(j, end) for j, end in self.claimed if j.holder != taker]
        self.holder = {op: held for op, held in self.holder.items() if held[0].holder != taker}

    @rule(seconds=st.sampled_from([LEASE / 2, LEASE + 1]))
    def time_passes(self, seconds: float) -> None:
        """Time passes on the database's clock (past a lease: its holder stalled, and is now late)."""
        self.now += seconds

    @rule(step=st.sampled_from([-600.0, 0.0, 600.0]))
    def clock_step(self, step: float) -> None:
        """The node's own clock is stepped ten minutes (NTP, a resumed VM): nothing about leases may change."""
        self.step = step

    @rule()
    def user_retries(self) -> None:
        """`watcher retry --in-doubt`: held operations may be sent again (each re-send is recorded)."""
        held = [(r["sha256"], r["service"], r["operation"], r["params"]) for r in self.store.in_doubt_operations()]
        self.store.gate_resend(held)

    # -- what must hold ------------------------------------------------------------------------------------

    @invariant()
    def every_extra_send_was_recorded(self) -> None:
        for op in OPS:
            row = self.store.gate_get(op)
            sends = 0 if row is None else int(row["sends"])
            assert sends == self.sends[op]
            assert sends <= 1 + self.recorded[op], f"{op.name} sent {sends} times, {self.recorded[op]} recorded"
            if row is not None and row["state"] == "sending":
                fences = [f.ticket.fence for f in self.sent if f.op == op and f.ticket.fence is not None]
                holding = [x for x in fences if (x.holder, x.generation) == (row["holder"], row["generation"])]
                assert len(holding) <= 1, "two takes could both decide one operation"

    @invariant()
    def the_cap_is_never_passed(self) -> None:
        for day in self._spend():
            assert day["seconds"] <= CAP + 1e-9

    @invariant()
    def the_ledger_adds_up_to_the_spend(self) -> None:
        spent: dict[str, tuple[float, int]] = {}
        for line in self._ledger():
            if line["outcome"] != "not_sent":
                seconds, calls = spent.get(line["day"], (0.0, 0))
                spent[line["day"]] = (seconds + line["seconds"], calls + 1)
        rows = {d["day"]: (round(d["seconds"], 6), d["calls"]) for d in self._spend() if d["calls"] or d["seconds"]}
        assert rows == {day: (round(seconds, 6), calls) for day, (seconds, calls) in spent.items()}

    def no_operation_is_stuck(self) -> None:
        """Once every lease has run out, a new taker gets a decision for every operation, never "wait", and every
        unfinished job can be claimed."""
        later = self.now + 2 * LEASE + 1
        claimable = set()
        while (job := self.store.claim("archive", "last:1:1@" + "f" * 16, lease=LEASE, now=later)) is not None:
            claimable.add(job.id)
        assert claimable == set(range(1, JOBS + 1)) - self.done
        for op in OPS:
            ticket = self.store.gate_take([op], "last:1:1@" + "f" * 16, budget="other", seconds=0.0,
                                          resend_in_doubt=True, now=later)[0]  # fmt: skip
            assert ticket.verdict in ("send", "answered"), (op.name, ticket.verdict)

    def _ledger(self) -> list[dict[str, Any]]:
        sql = "SELECT day, seconds, outcome FROM ledger WHERE service='processing'"
        if isinstance(self.store, Store):
            return [dict(r) for r in self.store._db.execute(sql)]
        return [dict(r) for r in self.store._all(sql)]

    def _spend(self) -> list[dict[str, Any]]:
        sql = "SELECT day, seconds, calls FROM spend WHERE service='processing'"
        if isinstance(self.store, Store):
            return [dict(r) for r in self.store._db.execute(sql)]
        return [dict(r) for r in self.store._all(sql)]


def test_the_gate_keeps_its_promises_on_sqlite(tmp_path):
    """The model against SQLite: a new store per example (in CI three times the profile's examples: they are cheap)."""
    counter = iter(range(1_000_000))

    def fresh(clock: Callable[[], float]) -> Store:
        return Store(tmp_path / f"gate-{next(counter)}.db")

    GateModel.open_store = staticmethod(fresh)  # type: ignore[assignment]
    examples = PROFILE.max_examples * (3 if PROFILE_NAME == "ci" else 1)
    run_state_machine_as_test(GateModel, settings=settings(PROFILE, max_examples=examples))


def test_the_gate_keeps_its_promises_on_postgresql(pg_url):
    """The model against real PostgreSQL: one database, emptied before each example; commits may lose their
    acknowledgement (the take is replayed)."""

    def fresh(clock: Callable[[], float]) -> PostgresStore:
        store = _LostAcks(pg_url, clock=clock, lease=LEASE)
        store._run(lambda db: db.execute("TRUNCATE operations, ledger, spend, jobs, files RESTART IDENTITY"))
        return store

    GateModel.open_store = staticmethod(fresh)  # type: ignore[assignment]
    run_state_machine_as_test(GateModel, settings=PROFILE)
