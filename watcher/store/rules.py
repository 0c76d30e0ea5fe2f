"""The store's rules, shared by both adapters (SQLite in ``store/sqlite``, PostgreSQL in ``store/postgres``): pure
decisions on rows already read, no database and no I/O.

What the gate answers for an operation's row (answered, wait, in doubt, a take replayed, the state after its sender
died), what a take's ledger line says (its kind, its operations), the cap's refusal, the UTC day keys, the fence
arguments, a job built from its row, and the errors both adapters raise (:class:`LeaseLost`, :class:`StoreTooNew`).
The states are drawn in the gate's docstring (``store/sqlite/gate.py``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

from watcher import __version__
from watcher.errors import ConfigError
from watcher.store.models import Fence, FileRevision, Job, Operation, State, Step, Ticket

WAIT_SECONDS = 1.0  # a taker told to wait looks again this much later
UNPAID = ("not_sent", "refused")  # ledger endings that cost nothing: taken back out of the day's spend

# A request whose sender died mid-call (a crash, a kill, the OOM killer) is asked again at most this many times;
# the next such death holds it in doubt: a file that stops the daemon must not be paid for at every restart.
CRASH_REASKS = 2
CRASHED = "the daemon stopped while the request was in flight"
HELD_AFTER_CRASHES = (
    f"the daemon stopped while this request was in flight, {CRASH_REASKS + 1} times: held, so that a file that "
    "stops the daemon is not paid for at every restart"
)
# The same rule as an SQL expression both dialects read, for a statement over many rows (``on_doubt`` and
# ``sends`` are the operation's columns).
AFTER_CRASH_SQL = f"CASE WHEN on_doubt='hold' OR sends > {CRASH_REASKS} THEN 'in_doubt' ELSE 'reask' END"
AFTER_CRASH_ERROR_SQL = (
    f"CASE WHEN on_doubt<>'hold' AND sends > {CRASH_REASKS} THEN '{HELD_AFTER_CRASHES.replace(chr(39), chr(39) * 2)}' "
    f"ELSE '{CRASHED}' END"
)

COUNT_CAP = 10_000  # a filtered list's total is counted up to this many (then shown as "10000+")
FINISHED = (State.DONE, State.FAILED, State.SKIPPED)  # what leaves the backlog: jobs_finished indexes these states
OPEN = (State.PENDING, State.IN_DOUBT, State.FAILED)

# One takeable operation as the gate's charge step holds it: (index in the request, operation, a re-send?,
# the generation this take gives it).
Takeable = tuple[int, Operation, bool, int]
OpKey = tuple[str, str, str, str]


class LeaseLost(Exception):
    """A job's commit or release was refused: its lease was lost or it was superseded (a newer revision arrived).

    The work it did is kept where it was paid for (results, operation IDs); the job's row is not touched.
    """


class StoreTooNew(ConfigError):
    """The store's schema is newer than this binary knows: it was used by a newer watcher (exit code 2)."""


def too_new(where: str, found: int, known: int) -> StoreTooNew:
    """The refusal to open a store of schema ``found`` with a binary that knows up to ``known``."""
    return StoreTooNew(
        f"the store at {where} has schema version {found}, but this watcher ({__version__}) knows versions up to "
        f"{known}: a newer watcher has used it. Nothing was changed. Run the newer watcher again, or restore a "
        "backup made before the upgrade (`watcher store restore PATH`; SQLite keeps copies in the state folder's "
        "backups/ before each migration)"
    )


# -- day keys -------------------------------------------------------------------------------------------------


def utc_day(now: float) -> str:
    """The UTC calendar day of a timestamp, as the ledger keys it (``2026-11-29``)."""
    return dt.datetime.fromtimestamp(now, dt.UTC).date().isoformat()


def next_utc_midnight(now: float) -> float:
    """When the next UTC day starts (when a daily cap resets)."""
    day = dt.datetime.fromtimestamp(now, dt.UTC).date() + dt.timedelta(days=1)
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


# -- the gate's verdicts --------------------------------------------------------------------------------------


class Verdict(StrEnum):
    """The gate's answer for one operation (:class:`Ticket`): ``send`` it (taken), or why not: ``answered`` (its
    result is stored), ``wait`` (another take holds it), ``in_doubt`` (held for the user), ``capped`` (the day's
    cap). Shown as its value in logs."""

    SEND = "send"
    ANSWERED = "answered"
    WAIT = "wait"
    IN_DOUBT = "in_doubt"
    CAPPED = "capped"


def op_key(op: Operation) -> OpKey:
    """An operation's primary key in ``operations``: (sha256, service, operation, params)."""
    return (op.sha256, op.service, op.name, op.params)


def op_key_of(row: Mapping[str, Any]) -> OpKey:
    """An operations row's key, as :func:`op_key` gives an Operation's."""
    return (row["sha256"], row["service"], row["operation"], row["params"])


def replayed(row: Any, take_id: str) -> bool:
    """True when ``row`` is held by the very take ``take_id``: the same take replayed (its commit's answer lost)."""
    return row is not None and row["state"] == "sending" and row["take_id"] == take_id


def own_ticket(op: Operation, row: Any) -> Ticket:
    """What a replayed take gets back: the ticket its first run was given (same request, same fence)."""
    fence = Fence(row["holder"], int(row["generation"]))
    return Ticket(Verdict.SEND, op, resend=int(row["sends"]) > 1, request=row["request"], fence=fence)


def crashed(row: Any, now: float) -> bool:
    """True when ``row`` (None: never taken) is being sent by a take whose lease ran out: its sender died."""
    return row is not None and row["state"] == "sending" and (row["lease_until"] or 0) < now


def after_crash(on_doubt: str, sends: int) -> tuple[str, str]:
    """What an operation whose sender died mid-call becomes, and why: held in doubt when its policy says hold or
    when it was sent ``CRASH_REASKS + 1`` times already; else asked again (a counted re-ask)."""
    if on_doubt != "hold" and sends > CRASH_REASKS:
        return "in_doubt", HELD_AFTER_CRASHES
    return ("in_doubt" if on_doubt == "hold" else "reask"), CRASHED


def verdict(
    op: Operation, row: Any, *, wait_until: float, since: float | None, resend_in_doubt: bool
) -> Ticket | None:
    """Why ``op`` (its ``row``, None when never taken; a crashed take already recovered) may not be sent by this
    taker: answered, wait (another take holds it: look again at ``wait_until``), in doubt (``since``, as the
    caller's clock shows it); None when it may take it."""
    state = None if row is None else row["state"]
    if state == "answered":
        return Ticket(Verdict.ANSWERED, op, result=row["result"])
    if state == "sending":
        return Ticket(Verdict.WAIT, op, until=wait_until, holder=row["holder"])
    if state == "in_doubt" and not resend_in_doubt:
        return Ticket(Verdict.IN_DOUBT, op, since=since, error=row["error"])
    return None


def takeable(i: int, op: Operation, row: Any) -> Takeable:
    """The charge step's entry for an operation this taker may take: a re-send when it was reasked or held, and
    the next generation (the fence its ticket hands out)."""
    if row is None:
        return (i, op, False, 1)
    return (i, op, row["state"] in ("reask", "in_doubt"), int(row["generation"]) + 1)


def ledger_kind(takeable: Sequence[Takeable]) -> str:
    """What a take is, as its ledger line says: ``first``, ``reask`` (re-asked models) or ``resend`` (held ones);
    ``takeable`` as the gate's charge step holds it (see :data:`Takeable`)."""
    again = [op for _, op, resend, _ in takeable if resend]
    if not again:
        return "first"
    return "reask" if all(op.on_doubt == "reask" for op in again) else "resend"


def ledger_line(takeable: Sequence[Takeable]) -> tuple[str, int, str, str, str]:
    """What a take's ledger line names: its operations (comma-separated), how many are models, its kind, and
    the content and endpoint of the request."""
    lead = takeable[0][1]
    names = ",".join(op.name for _, op, _, _ in takeable)
    models = sum(op.name.startswith("analyze:") for _, op, _, _ in takeable)
    return names, models, ledger_kind(takeable), lead.sha256, lead.service


def over_cap(spent: float, seconds: float, cap: float | None) -> bool:
    """True when ``seconds`` more would pass the day's ``cap`` (None: no cap) after ``spent``."""
    return cap is not None and spent + seconds > cap


def capped_tickets(
    takeable: Sequence[tuple[Any, ...]], until: float, *, first: bool, spent: float, cap: float
) -> dict[int, Ticket]:
    """The answer to every takeable operation when the day's cap would be passed (both stores give the same)."""
    return {
        i: Ticket(Verdict.CAPPED, op, until=until, first_cap=first, spent_seconds=spent, cap_seconds=cap)
        for i, op, *_ in takeable
    }


def sent_tickets(takeable: Sequence[Takeable], holder: str, request: int) -> dict[int, Ticket]:
    """The answer to every operation a take took: send it, under the ledger line ``request``, fenced."""
    return {
        i: Ticket(Verdict.SEND, op, resend=resend, request=request, fence=Fence(holder, generation))
        for i, op, resend, generation in takeable
    }


# -- fences ---------------------------------------------------------------------------------------------------


def fence_args(fence: Fence) -> tuple[str, int]:
    """The arguments of an operation's fence condition (holder, generation), in both dialects."""
    return (fence.holder, fence.generation)


def job_fence(job: Job) -> tuple[str | None, int | None, int | None]:
    """The arguments of a job's fence condition: its lease holder and its claim twice (None: any claim)."""
    return (job.holder, job.claim, job.claim)


def fenced(rowcount: int, job: Job) -> None:
    """A fenced write to ``job`` that changed no row: its lease was lost or it was superseded."""
    if rowcount == 0:
        raise LeaseLost(
            f"job {job.id} ({job.pipeline}) was superseded or its lease was lost; its result is not recorded"
        )


# -- rows -----------------------------------------------------------------------------------------------------


def job_of(row: Any, file: FileRevision) -> Job:
    """A job from its row (as either adapter's job select reads it) and its revision."""
    return Job(
        id=int(row["id"]),
        pipeline=row["pipeline"],
        step=Step(row["step"]),
        state=State(row["state"]),
        attempts=int(row["attempts"]),
        data=json.loads(row["data"]),
        file=file,
        last_error=row["last_error"],
        error_code=row["error_code"],
    )


def by_state(counts: Mapping[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """(pipeline, state) -> n as the nested report, without the zeros, sorted as the recount was."""
    out: dict[str, dict[str, int]] = {}
    for (pipeline, state), n in sorted(counts.items()):
        if n:
            out.setdefault(pipeline, {})[state] = int(n)
    return out


def below(path: str) -> tuple[bytes, bytes]:
    """The byte range [low, high) holding exactly the paths inside folder ``path``, as the stores compare them
    (memcmp): ``/a/b`` gives ``/a/b/`` up to ``/a/b0`` (``0`` follows ``/``), so ``/a/bc/x`` falls outside."""
    base = os.fsencode(path).rstrip(b"/")
    return base + b"/", base + b"0"


def path_order(jobs: Iterable[Job]) -> list[Job]:
    """``jobs`` once each (by ID), in the order of their names' bytes, then pipeline."""
    unique = {j.id: j for j in jobs}
    return sorted(unique.values(), key=lambda j: (os.fsencode(j.file.path), j.pipeline))
