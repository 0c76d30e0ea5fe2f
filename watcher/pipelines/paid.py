"""Paid calls, made one way only: through the store's gate (the states are drawn in watcher.store.sqlite.gate).

    take ─┬─ send ─▶ the request ─┬─ answered ............ its ID or results kept; never sent again
          │    (one wire ticket)   ├─ not sent (provably) . free to send again, not spent
          │                        ├─ refused (4xx) ....... free again, not spent, not a paid call
          │                        └─ answer lost ........ in doubt (held for the user) or re-asked (counted)
          │                           or unreadable (a 2xx without its ID, a 3xx, a body not the documented shape)
          ├─ answered already ...... reused: nothing is sent
          ├─ wait .................. another job (another copy, another daemon) is sending it: Deferred
          ├─ capped ................ the day's cap would be passed: Deferred until 00:00 UTC
          └─ in doubt .............. held until `watcher retry`: InDoubt

Both pipelines make their paid requests through :class:`PaidCalls`; nothing else calls the gate. A take that may
send issues the wire ticket (watcher.sending) the HTTP policy requires for exactly one request to a paid endpoint:
a retry, whatever its cause (even a NotSent: no connection, a 429), is the runner's next attempt, hence a new take,
counted, charged and capped like the first; there is no retry loop below the gate.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from watcher.errors import Deferred, InDoubt, Malformed, NeedsUser, NotSent, Rejected
from watcher.names import display
from watcher.pipelines.base import NullSpend, SpendObserver
from watcher.sending import WireTicket, issue
from watcher.store import Fence, Job, Operation, Ticket
from watcher.store.aio import AsyncGate
from watcher.store.rules import Verdict

log = structlog.get_logger("watcher.paid")


GateStore = AsyncGate  # the store's gate, asynchronous (watcher.store.aio): the only door paid calls go through


def ending_of(exc: BaseException, taken: Taken | None) -> str:
    """How a paid request that raised ``exc`` ended, as the ledger records it; ``taken``: its take, whose wire
    ticket is spent once the request was handed to the transport.

    ``not_sent``: provably not processed (NotSent: never connected, 429/503, a body cut short; or stopped before
    it was handed over, or before its body's last piece was: ``partial_body``); ``refused``: the service answered
    4xx before any work (a bad key, a refused file);
    ``in_doubt``: everything else once the whole request may have been sent (5xx, a timeout, a cut stream, and
    any answer that cannot be read: a 2xx without the expected ID, a 3xx, a body not of the documented shape).
    """
    if isinstance(exc, NotSent) or taken is None or taken.wire is None or not taken.wire.used:
        return "not_sent"
    if taken.wire.partial_body:  # stopped or cut before the body's last piece left: no whole request arrived
        return "not_sent"
    if isinstance(exc, Malformed):
        return "in_doubt"
    if isinstance(exc, Rejected | NeedsUser) and exc.status is not None and 400 <= exc.status < 500:
        return "refused"
    return "in_doubt"


@dataclass
class Taken:
    """The gate's answer for one request's operations: what may be sent now, and what was answered already."""

    tickets: list[Ticket]
    seconds: float
    send: list[Operation] = field(default_factory=list)
    resends: list[Operation] = field(default_factory=list)
    answered: dict[Operation, str | None] = field(default_factory=dict)
    request: int | None = None  # the ledger line of the request, when something is to be sent
    estimated: bool = False  # ``seconds`` is an upper bound (no duration in the headers)
    fences: dict[Operation, Fence] = field(default_factory=dict)  # what each sent operation's ending must name
    late: bool = False  # an ending came after this take lost an operation (its lease ran out): recorded `late`
    wire: WireTicket | None = None  # the one request's ticket (spent: the request was handed over)


class PaidCalls:
    """One budget's paid requests (``budget``: analysis or processing), its daily cap, and who is told."""

    def __init__(
        self,
        store: GateStore,
        budget: str,
        *,
        cap_minutes: float = 0.0,
        resend_in_doubt: bool = False,
        spend: SpendObserver | None = None,
    ) -> None:
        self.store = store
        self.budget = budget
        self.cap_seconds = cap_minutes * 60 if cap_minutes else None
        self.resend_in_doubt = resend_in_doubt
        self.spend = spend or NullSpend()

    async def take(self, job: Job, ops: Sequence[Operation], seconds: float, *, estimated: bool = False) -> Taken:
        """Take the operations of one request covering ``seconds`` of audio (``estimated``: an upper bound); raises
        when nothing may be sent now and not everything was answered already (Deferred: wait or capped; InDoubt:
        held). When something may be sent, this task holds the wire ticket for exactly that one request."""
        assert job.holder is not None, "a paid request needs a claimed job"
        tickets = await self.store.gate_take(
            list(ops),
            job.holder,
            budget=self.budget,
            seconds=seconds,
            cap_seconds=self.cap_seconds,
            resend_in_doubt=self.resend_in_doubt,
            estimated=estimated,
        )
        taken = Taken(tickets, seconds, estimated=estimated)
        for ticket in tickets:
            if ticket.verdict == Verdict.SEND:
                taken.send.append(ticket.op)
                taken.request = ticket.request
                assert ticket.fence is not None
                taken.fences[ticket.op] = ticket.fence
                if ticket.resend:
                    taken.resends.append(ticket.op)
            elif ticket.verdict == Verdict.ANSWERED:
                taken.answered[ticket.op] = ticket.result
        if not taken.send and len(taken.answered) < len(tickets):
            raise self.not_now(job, tickets)
        if taken.send and taken.request is not None:
            taken.wire = issue(WireTicket(taken.request, tuple(op.name for op in taken.send)))
        if taken.resends:
            log.warning(
                "paid.resend",
                path=display(job.file.path),
                sha256=taken.resends[0].sha256,
                operations=[op.name for op in taken.resends],
                next="sending again a request whose answer was lost: the service may count it twice",
            )
        return taken

    async def finish(self, taken: Taken, results: Mapping[Operation, str | None], ending: str, why: str) -> None:
        """Record how the request ended: ``results`` holds the operations answered (with the ID to keep, or None
        when it was kept already); the others are free again (``not_sent``, ``refused``) or in doubt / re-asked."""
        if taken.request is None:
            return
        for op in taken.send:
            fence = taken.fences[op]
            if op in results:
                if results[op] is not None:
                    taken.late |= not await self.store.gate_answered(op, results[op], fence=fence)
            elif ending in ("not_sent", "refused"):
                # Back to where the take found it: a re-ask or re-send that did not go stays one, so the take that
                # finally sends it is reported as such (the service may have been paid for it before).
                back = "reask" if op in taken.resends else "open"
                taken.late |= not await self.store.gate_release(op, back, fence=fence, error=why)
            else:
                state = "in_doubt" if op.on_doubt == "hold" else "reask"
                taken.late |= not await self.store.gate_release(op, state, fence=fence, error=why)
        if ending == "answered" and len(results) < len(taken.send):
            ending = "partial"
        # paid, but after its lease ran out: the new holder's state stands
        if taken.late and ending not in ("not_sent", "refused"):
            log.warning(
                "paid.late",
                sha256=taken.send[0].sha256 if taken.send else None,
                operations=[op.name for op in taken.send],
                next="this request's lease ran out before it ended; its answer is kept, the operation's new "
                "holder decides what happens to it",
            )
            ending = "late"
        await self.store.ledger_ending(taken.request, ending)
        operation = taken.send[0].name.split(":", 1)[0] if taken.send else "?"
        unpaid = ending in ("not_sent", "refused")
        self.spend.paid(self.budget, operation, ending, 0.0 if unpaid else taken.seconds)

    def doubt(self, op: Operation, since: float, why: str | None) -> InDoubt:
        """The error that holds a job whose paid request ``op`` may have been done."""
        return InDoubt(
            f"{op.name} may have reached the service whole but its answer was lost ({why or 'no answer'}); it may "
            "have been done and billed, so it is held: `watcher retry --in-doubt` (or `watcher retry PATH`) sends it "
            "again",
            operation=op.name,
            since=since,
            keys=[[op.sha256, op.service, op.name, op.params]],
        )

    def not_now(self, job: Job, tickets: Sequence[Ticket]) -> Exception:
        """Why nothing is sent now, as the error the runner schedules by (cap first, then doubt, then wait)."""
        capped = next((t for t in tickets if t.verdict == Verdict.CAPPED), None)
        if capped is not None:
            assert capped.until is not None and capped.cap_seconds is not None
            if capped.first_cap:
                self.spend.capped(self.budget, capped.spent_seconds, capped.cap_seconds, capped.until)
            return Deferred(
                f"the daily cap of {capped.cap_seconds / 60:g} audio minutes for the {self.budget} service is "
                f"reached ({capped.spent_seconds / 60:.1f} used today); resumes after 00:00 UTC",
                until=capped.until,
                code="capped",
            )
        held = next((t for t in tickets if t.verdict == Verdict.IN_DOUBT), None)
        if held is not None:
            return self.doubt(held.op, held.since or time.time(), held.error)
        waiting = [t for t in tickets if t.verdict == Verdict.WAIT]
        names = ", ".join(t.op.name for t in waiting)
        return Deferred(
            f"another copy of this content is already being sent ({names}); waiting for its answer instead of "
            "paying twice",
            until=min((t.until or time.time() + 1) for t in waiting) if waiting else time.time() + 1,
        )
