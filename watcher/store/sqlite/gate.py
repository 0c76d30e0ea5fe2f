"""The gate every paid call passes, and the spend ledger it writes.

A paid call is an :class:`Operation`: (content sha256, service endpoint and account, operation, parameters).
Before a request is sent, :meth:`GateMixin.gate_take` records the intent and takes the operation, in one
transaction, under the table's primary key, so a second job (or a second daemon on the same store) that needs
the same operation is told to wait instead of sending. Each take writes a ledger line (the audio seconds the
request covers) and checks the service's daily cap in the same transaction, so a cap is never exceeded.

States of an operation::

    open ──take──▶ sending ──answered──▶ answered (its ID is kept: never sent again)
                      │  ├──not sent (provably)──▶ open
                      │  └──answer lost──▶ in_doubt (on_doubt="hold": held for the user)
                      │                    reask   (on_doubt="reask": asked again, counted)
                      └──lease expired (a crash)──▶ in_doubt / reask
    in_doubt ──`watcher retry`──▶ reask ──take──▶ sending (a re-send, counted and logged)

Each take is one ledger line: the request's operations, its content and endpoint, the audio seconds charged
(``estimated`` when the headers gave no duration: an upper bound, settled later to the real one), whether it is a
``first`` send, a ``reask`` (models asked again after a stream that did not answer them all) or a ``resend``
(an in-doubt request sent again), and its ending: ``answered``, ``partial``, ``in_doubt``, or not paid at all:
``not_sent`` (provably never reached the service) and ``refused`` (the service said no before any work, e.g.
401/403/422): those two are taken back out of the day's spend.

Every take grows the operation's ``generation`` and hands its :class:`Fence` (holder, generation) out with the
ticket; an ending (answered, released) is a compare-and-set on that fence. An ending whose take lost the
operation (its lease ran out while it stalled, and the operation was recovered or taken again) is *late*: its
ledger line says ``late``, a paid answer is kept by content (results; an ID is adopted when nobody holds the
operation, else kept beside it in ``late_result`` for the holder whose answer gets lost), and nothing the new
holder owns changes. A take carries its own ID, so one replayed after its commit's acknowledgement was lost
recognises itself instead of waiting on its own operation.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from watcher.names import text
from watcher.store.models import Fence, Operation, Ticket
from watcher.store.rules import (
    AFTER_CRASH_ERROR_SQL,
    AFTER_CRASH_SQL,
    UNPAID,
    WAIT_SECONDS,
    Takeable,
    after_crash,
    capped_tickets,
    crashed,
    fence_args,
    ledger_line,
    next_utc_midnight,
    op_key,
    over_cap,
    own_ticket,
    replayed,
    sent_tickets,
    takeable,
    utc_day,
    verdict,
)

if TYPE_CHECKING:
    from watcher.store.sqlite.core import StoreBase

    _Base = StoreBase
else:
    _Base = object

_KEY = "sha256=? AND service=? AND operation=? AND params=?"
_FENCED = " AND state='sending' AND holder=? AND generation=?"
# A late answer is adopted where nobody holds the operation (paid work is never thrown away).
_UNHELD = " AND state IN ('open', 'reask', 'in_doubt')"
_key = op_key


def _rows_by_key(db: Any, ops: Sequence[Operation]) -> dict[tuple[str, str, str, str], Any]:
    """The rows of ``ops`` already taken once, read in one statement (one primary-key search each), by key."""
    if not ops:
        return {}
    rows = db.execute(
        "SELECT * FROM operations WHERE " + " OR ".join([f"({_KEY})"] * len(ops)),
        [v for op in ops for v in _key(op)],
    ).fetchall()
    return {(r["sha256"], r["service"], r["operation"], r["params"]): r for r in rows}


def answered(db: Any, op: Operation, result: str | None, fence: Fence, now: float, *, remote: bool) -> bool:
    """The answer to the take ``fence`` names, in an open transaction: the operation is answered when that take
    still holds it (True); a late answer (False) is adopted where nobody holds it, else kept in ``late_result``."""
    keep = "result=COALESCE(?, result), " + ("remote_state=COALESCE(remote_state, 'requested'), " if remote else "")
    done = f"UPDATE operations SET state='answered', {keep}holder=NULL, lease_until=NULL, error=NULL, since=NULL, "
    if db.execute(done + f"updated_at=? WHERE {_KEY}{_FENCED}", (result, now, *_key(op), *fence_args(fence))).rowcount:
        return True
    if not db.execute(done + f"updated_at=? WHERE {_KEY}{_UNHELD}", (result, now, *_key(op))).rowcount and result:
        db.execute(
            f"UPDATE operations SET late_result=COALESCE(late_result, ?) WHERE {_KEY} AND result IS NOT ?",
            (result, *_key(op), result),
        )
    return False


def adopt_late(db: Any, op: Operation, now: float) -> None:
    """An operation nobody holds any more whose late answer was kept is answered by it (never sent again)."""
    db.execute(
        "UPDATE operations SET state='answered', result=late_result, late_result=NULL, error=NULL, since=NULL, "
        f"remote_state=COALESCE(remote_state, 'requested'), updated_at=? WHERE {_KEY}{_UNHELD} "
        "AND late_result IS NOT NULL",
        (now, *_key(op)),
    )


class GateMixin(_Base):
    """The paid-operation gate and the spend ledger (see the module docstring for the states)."""

    def gate_take(
        self,
        ops: Sequence[Operation],
        holder: str,
        *,
        budget: str,
        seconds: float,
        cap_seconds: float | None = None,
        lease: float = 600.0,
        resend_in_doubt: bool = False,
        estimated: bool = False,
        now: float | None = None,
        take_id: str | None = None,
    ) -> list[Ticket]:
        """Decide, for each operation of one request, whether this caller may send it; take those it may.

        ``budget`` names the budget whose daily cap applies and ``seconds`` the audio the request covers (once,
        however many operations it carries; ``estimated``: an upper bound, settled by ``ledger_settle``).
        Operations held elsewhere come back as ``wait``; a cap the request
        would pass makes every takeable one ``capped``. ``resend_in_doubt`` takes in-doubt ones too (policy).
        ``take_id`` names this take (default: a new one); the same take replayed gets its own tickets back.
        """
        now = time.time() if now is None else now
        take_id = take_id or uuid.uuid4().hex
        tickets: dict[int, Ticket] = {}
        free: list[Takeable] = []
        with self._tx() as db:
            rows = _rows_by_key(db, ops)
            for i, op in enumerate(ops):
                row = rows.get(_key(op))
                if replayed(row, take_id):
                    tickets[i] = own_ticket(op, row)
                    continue
                row = self._recovered(db, op, row, now)
                since = None if row is None else row["since"]
                ticket = verdict(op, row, wait_until=now + WAIT_SECONDS, since=since, resend_in_doubt=resend_in_doubt)
                if ticket is None:
                    free.append(takeable(i, op, row))
                else:
                    tickets[i] = ticket
            if free:
                charged = self._charge(db, free, holder, budget, seconds, cap_seconds, now, estimated=estimated)
                tickets.update(charged)
                request = charged[free[0][0]].request
                if request is not None:  # within the cap: taken
                    self._take(db, free, holder, now + lease, take_id, request, now)
        return [tickets[i] for i in range(len(ops))]

    def _recovered(self, db: Any, op: Operation, row: Any, now: float) -> Any:
        """``op``'s row, after a crash of the take that held it: in doubt or reasked (see ``after_crash``), or
        answered by a late answer kept beside it."""
        if not crashed(row, now):
            return row
        state, why = after_crash(op.on_doubt, int(row["sends"]))  # its sender died mid-call
        self._set_state(db, op, state, now, error=why)
        return db.execute(f"SELECT * FROM operations WHERE {_KEY}", _key(op)).fetchone()

    def _charge(
        self,
        db: Any,
        free: list[Takeable],
        holder: str,
        budget: str,
        seconds: float,
        cap_seconds: float | None,
        now: float,
        *,
        estimated: bool = False,
    ) -> dict[int, Ticket]:
        """Check the day's cap and, within it, charge the day's spend and write the ledger line: every takeable
        operation's ticket (send, or capped). Without a cap the day's spend row is made and charged by one
        statement; with one it is read first."""
        day = utc_day(now)
        if cap_seconds is None:
            db.execute(
                "INSERT INTO spend (day, service, seconds, calls) VALUES (?, ?, ?, 1) ON CONFLICT (day, service) "
                "DO UPDATE SET seconds=seconds+excluded.seconds, calls=calls+1",
                (day, budget, seconds),
            )
        else:
            spent = db.execute(
                "INSERT INTO spend (day, service) VALUES (?, ?) ON CONFLICT (day, service) DO UPDATE SET day=day "
                "RETURNING seconds, capped_at",
                (day, budget),
            ).fetchone()
            if over_cap(spent["seconds"], seconds, cap_seconds):
                first = spent["capped_at"] is None
                if first:
                    db.execute("UPDATE spend SET capped_at=? WHERE day=? AND service=?", (now, day, budget))
                until = next_utc_midnight(now)
                return capped_tickets(free, until, first=first, spent=spent["seconds"], cap=cap_seconds)
            db.execute(
                "UPDATE spend SET seconds=seconds+?, calls=calls+1 WHERE day=? AND service=?", (seconds, day, budget)
            )
        names, models, kind, sha256, endpoint = ledger_line(free)
        cur = db.execute(
            "INSERT INTO ledger (at, day, service, operation, sha256, seconds, models, outcome, kind, estimated, "
            "endpoint) VALUES (?, ?, ?, ?, ?, ?, ?, 'sending', ?, ?, ?)",
            (now, day, budget, names, sha256, seconds, models, kind, estimated, endpoint),
        )
        return sent_tickets(free, holder, int(cur.lastrowid or 0))

    def _take(
        self, db: Any, free: list[Takeable], holder: str, until: float, take_id: str, request: int, now: float
    ) -> None:
        """Take every operation of a charged request: ``sending``, held by ``holder`` until ``until``, fenced by
        its new generation, under the request's ledger line."""
        rows = ",".join(["(?, ?, ?, ?, ?, 'sending', ?, ?, 1, ?, ?, ?, ?, ?)"] * len(free))
        db.execute(
            "INSERT INTO operations (sha256, service, operation, params, on_doubt, state, holder, "
            f"lease_until, sends, generation, take_id, request, created_at, updated_at) VALUES {rows} "
            "ON CONFLICT (sha256, service, operation, params) DO UPDATE SET state='sending', "
            "holder=excluded.holder, lease_until=excluded.lease_until, sends=sends+1, error=NULL, "
            "since=NULL, generation=excluded.generation, take_id=excluded.take_id, request=excluded.request, "
            "updated_at=excluded.updated_at",
            [
                v
                for _, op, _, gen in free
                for v in (*_key(op), op.on_doubt, holder, until, gen, take_id, request, now, now)
            ],
        )

    def _set_state(self, db: Any, op: Operation, state: str, now: float, *, error: str | None = None) -> None:
        error = text(error)
        db.execute(
            "UPDATE operations SET state=?, holder=NULL, lease_until=NULL, error=?, updated_at=?, "
            f"since=CASE WHEN ?='in_doubt' THEN ? ELSE since END WHERE {_KEY}",
            (state, error, now, state, now, *_key(op)),
        )

    def gate_answered(self, op: Operation, result: str | None = None, *, fence: Fence) -> bool:
        """The service answered the take ``fence`` names: keep its ID (processing) so the operation is never sent
        again. False when that take lost the operation (late): the ID is kept all the same (see the module)."""
        now = time.time()
        with self._tx() as db:
            return answered(db, op, result, fence, now, remote=True)

    def gate_release(self, op: Operation, state: str, *, fence: Fence, error: str | None = None) -> bool:
        """No answer: ``open`` (provably not sent), ``reask`` (ask again, counted) or ``in_doubt`` (held). False when
        the take ``fence`` names lost the operation (late): nothing changes."""
        assert state in ("open", "reask", "in_doubt"), state
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE operations SET state=?, holder=NULL, lease_until=NULL, error=?, updated_at=?, "
                f"since=CASE WHEN ?='in_doubt' THEN ? ELSE since END WHERE {_KEY}{_FENCED}",
                (state, text(error), now, state, now, *_key(op), fence.holder, fence.generation),
            )
            adopt_late(db, op, now)
            return bool(cur.rowcount)

    def ledger_ending(self, request: int, ending: str) -> None:
        """Record how a request ended (answered, partial, in_doubt, not_sent, refused); one not paid (UNPAID) is
        taken back out of the day's spend, once."""
        if ending not in UNPAID:  # nothing else to change: one statement is the transaction
            self._write("UPDATE ledger SET outcome=? WHERE id=? AND outcome<>?", (ending, request, ending))
            return
        with self._tx() as db:
            row = db.execute(
                "UPDATE ledger SET outcome=? WHERE id=? AND outcome NOT IN ('not_sent', 'refused') "
                "RETURNING seconds, day, service",
                (ending, request),
            ).fetchone()
            if row is not None:  # it was spent before: the update changed it
                db.execute(
                    "UPDATE spend SET seconds=MAX(0, seconds-?), calls=MAX(0, calls-1) WHERE day=? AND service=?",
                    (row["seconds"], row["day"], row["service"]),
                )

    def ledger_settle(self, sha256: str, seconds: float) -> int:
        """The real audio seconds of a content whose lines were charged an estimate: every such line, and the
        day's spend of each, follows it; returns how many lines were settled."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT id, seconds, day, service, outcome FROM ledger WHERE sha256=? AND estimated", (sha256,)
            ).fetchall()
            for row in rows:
                db.execute("UPDATE ledger SET seconds=?, estimated=0 WHERE id=?", (seconds, row["id"]))
                if row["outcome"] not in UNPAID:
                    db.execute(
                        "UPDATE spend SET seconds=MAX(0, seconds+?) WHERE day=? AND service=?",
                        (seconds - row["seconds"], row["day"], row["service"]),
                    )
            return len(rows)

    def ledger_lines(self, first_day: str, last_day: str) -> list[dict[str, Any]]:
        """Every ledger line of the UTC days ``first_day`` to ``last_day`` (inclusive, ISO dates), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM ledger WHERE day BETWEEN ? AND ? ORDER BY id", (first_day, last_day)
            ).fetchall()
        return [dict(r) | {"estimated": bool(r["estimated"])} for r in rows]

    def gate_get(self, op: Operation) -> dict[str, Any] | None:
        """The operation's row (state, result, remote_state, sends, ...), or None when never taken."""
        with self._lock:
            row = self._db.execute(f"SELECT * FROM operations WHERE {_KEY}", _key(op)).fetchone()
        return None if row is None else dict(row)

    def set_remote_state(self, op: Operation, state: str, error: str | None = None) -> None:
        """What the service last said of the object an answered operation created: requested, complete, failed."""
        with self._tx() as db:
            db.execute(
                f"UPDATE operations SET remote_state=?, remote_error=?, updated_at=? WHERE {_KEY}",
                (state, text(error), time.time(), *_key(op)),
            )

    def forget_operation(self, op: Operation) -> None:
        """Drop an answered operation whose object the service no longer knows, so it is created again knowingly."""
        with self._tx() as db:
            db.execute(f"DELETE FROM operations WHERE {_KEY}", _key(op))

    def gate_resend(self, ops: Sequence[tuple[str, str, str, str]]) -> int:
        """The user's word: in-doubt operations (keyed as stored) may be sent again; returns how many."""
        changed = 0
        with self._tx() as db:
            for key in ops:
                cur = db.execute(
                    f"UPDATE operations SET state='reask', updated_at=? WHERE state='in_doubt' AND {_KEY}",
                    (time.time(), *key),
                )
                changed += cur.rowcount
        return changed

    def gate_recover(self, holder: str | None = None) -> int:
        """After a crash: operations left ``sending`` (by ``holder``, or by anyone) become in doubt or re-asks."""
        now = time.time()
        with self._tx() as db:
            where = "state='sending'" + (" AND holder=?" if holder else "")
            args: tuple[Any, ...] = (holder,) if holder else ()
            recovered = db.execute(
                f"UPDATE operations SET state={AFTER_CRASH_SQL}, error={AFTER_CRASH_ERROR_SQL}, "
                f"since=CASE {AFTER_CRASH_SQL} WHEN 'in_doubt' THEN ? ELSE since END, holder=NULL, lease_until=NULL, "
                f"updated_at=? WHERE {where} "
                "RETURNING sha256, service, operation, params, late_result",
                (now, now, *args),
            ).fetchall()
            for r in recovered:  # a late answer kept beside one of them answers it
                if r["late_result"] is not None:
                    adopt_late(db, Operation(r["sha256"], r["service"], r["operation"], r["params"]), now)
            return len(recovered)

    def answered_operations(self, sha256: str, service: str) -> set[str]:
        """The operations already answered for this content at this service (what would not be sent again)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT operation FROM operations WHERE sha256=? AND service=? AND state='answered'", (sha256, service)
            ).fetchall()
        return {r[0] for r in rows}

    def in_doubt_operations(self) -> list[dict[str, Any]]:
        """Every operation held in doubt, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM operations WHERE state='in_doubt' ORDER BY since").fetchall()
        return [dict(r) for r in rows]

    def spend_on(self, day: str) -> dict[str, dict[str, Any]]:
        """Per budget (service): audio seconds and paid calls recorded on a UTC day, and when a cap was reached."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM spend WHERE day=?", (day,)).fetchall()
        return {r["service"]: {"seconds": r["seconds"], "calls": r["calls"], "capped_at": r["capped_at"]} for r in rows}

    def adopt_legacy(self, old: str, new: str) -> int:
        """Give rows keyed before endpoints and accounts were part of the key (``legacy:<old>``) the current key."""
        with self._tx() as db:
            n = db.execute("UPDATE OR IGNORE operations SET service=? WHERE service=?", (new, f"legacy:{old}")).rowcount
            n += db.execute("UPDATE OR IGNORE results SET backend=? WHERE backend=?", (new, f"legacy:{old}")).rowcount
            return n
