"""The paid-operation gate and spend ledger in PostgreSQL: one transaction under the operation's key."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from watcher.names import text
from watcher.store.models import Fence, Operation, Ticket
from watcher.store.postgres.base import adopt_late, got, op_answered, opt_local, set_op_state
from watcher.store.postgres.schema import KEY_WHERE, NOW, OP_FENCED
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
    op_key_of,
    over_cap,
    own_ticket,
    replayed,
    sent_tickets,
    takeable,
    utc_day,
    verdict,
)

if TYPE_CHECKING:
    from watcher.store.postgres.base import PgBase as _Base
else:
    _Base = object


# Operation keys in the order Python sorts them (code points: the "C" collation), the order rows are locked in.
_IN_KEY_ORDER = ", ".join(f'{c} COLLATE "C"' for c in ("sha256", "service", "operation", "params"))


def _any_key(count: int) -> str:
    """A condition matching any of ``count`` operation keys (one primary-key search each)."""
    return " OR ".join([f"({KEY_WHERE})"] * count)


class PgGateMixin(_Base):
    """The gate (same states as watcher.store.sqlite.gate)."""

    # -- the gate (same states as watcher.store.sqlite.gate) ----------------------------------------------------

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
        """Decide for each operation of one request whether this caller may send it, taking those it may, in one
        transaction: operation rows locked by primary key, the day's spend row locked for the cap check. Leases
        and the day are the database's clock (``now``, for tests only, stands for what it reads). A replay of
        this transaction (its commit's acknowledgement lost) finds the operations held by its own ``take_id``
        and gets the same tickets back."""
        if not ops:
            return []
        lease = min(lease, self.lease)
        take = take_id or uuid.uuid4().hex
        local_now = self._clock()

        def go(db: psycopg.Connection[Any]) -> list[Ticket]:
            at = self._now(db) if now is None else now
            tickets: dict[int, Ticket] = {}
            free: list[Takeable] = []
            rows = self._locked_rows(db, ops, at)
            for i, op in enumerate(ops):
                row = rows[op_key(op)]
                if replayed(row, take):
                    tickets[i] = own_ticket(op, row)
                    continue
                if crashed(row, at) and not self._server_restarted_under(db, row, at):
                    state, why = after_crash(op.on_doubt, int(row["sends"]))  # its sender died mid-call
                    set_op_state(db, op, state, at, error=why)
                    row = got(db.execute(f"SELECT * FROM operations WHERE {KEY_WHERE}", op_key(op)).fetchone())
                since = None if row["since"] is None else local_now - (at - row["since"])
                ticket = verdict(
                    op, row, wait_until=local_now + WAIT_SECONDS, since=since, resend_in_doubt=resend_in_doubt
                )
                if ticket is None:
                    free.append(takeable(i, op, row))
                else:
                    tickets[i] = ticket
            if free:
                charged = self._charge(
                    db, free, budget, seconds, cap_seconds, at, local_now, holder, estimated=estimated
                )
                tickets.update(charged)
                request = charged[free[0][0]].request
                if request is not None:  # within the cap: taken
                    self._take(db, free, holder, at + lease, take, request, at)
            return [tickets[i] for i in range(len(ops))]

        return self._run(go)

    @staticmethod
    def _locked_rows(db: psycopg.Connection[Any], ops: Sequence[Operation], at: float) -> dict[Any, Any]:
        """The rows of ``ops`` (an ``open`` placeholder made for those never taken), locked in one fixed order so
        that two takers cannot deadlock, by key."""
        keys = sorted({op_key(op): op for op in ops}.items())
        db.execute(
            "INSERT INTO operations (sha256, service, operation, params, on_doubt, state, created_at, updated_at) "
            f"VALUES {','.join(['(%s, %s, %s, %s, %s, %s, %s, %s)'] * len(keys))} ON CONFLICT DO NOTHING",
            [v for key, op in keys for v in (*key, op.on_doubt, "open", at, at)],
        )
        return {
            op_key_of(r): r
            for r in db.execute(
                f"SELECT * FROM operations WHERE {_any_key(len(keys))} "
                f"ORDER BY {_IN_KEY_ORDER} FOR UPDATE",  # locked in the same order as inserted
                [v for key, _ in keys for v in key],
            ).fetchall()
        }

    def _server_restarted_under(self, db: psycopg.Connection[Any], op_row: Any, at: float) -> bool:
        """Whether the server restarted (less than a lease ago) under this take: a lease that ran out while it was
        down is no sign that its holder died (nobody could renew one), and the holder may have the answer in its
        journal to replay; it gets a lease from the restart to come back before the operation is taken over."""
        row = db.execute("SELECT extract(epoch FROM pg_postmaster_start_time()) AS started").fetchone()
        started = float(row["started"]) if row is not None else 0.0
        return float(op_row["updated_at"] or 0) < started and at < started + self.lease

    @staticmethod
    def _charge(
        db: psycopg.Connection[Any],
        free: list[Takeable],
        budget: str,
        seconds: float,
        cap_seconds: float | None,
        at: float,
        local_now: float,
        holder: str,
        *,
        estimated: bool,
    ) -> dict[int, Ticket]:
        """The day's cap checked (its spend row locked) and, within it, the day's spend charged and the ledger
        line written: every takeable operation's ticket (send, or capped until the next UTC day)."""
        day = utc_day(at)
        if cap_seconds is None:  # the day's row made and charged by one statement
            db.execute(
                "INSERT INTO spend (day, service, seconds, calls) VALUES (%s, %s, %s, 1) "
                "ON CONFLICT (day, service) DO UPDATE SET seconds=spend.seconds+excluded.seconds, "
                "calls=spend.calls+1",
                (day, budget, seconds),
            )
        else:
            spent = got(
                db.execute(
                    "INSERT INTO spend (day, service) VALUES (%s, %s) ON CONFLICT (day, service) "
                    "DO UPDATE SET day=excluded.day RETURNING seconds, capped_at",
                    (day, budget),
                ).fetchone()
            )
            if over_cap(spent["seconds"], seconds, cap_seconds):
                first = spent["capped_at"] is None
                if first:
                    db.execute("UPDATE spend SET capped_at=%s WHERE day=%s AND service=%s", (at, day, budget))
                until = local_now + (next_utc_midnight(at) - at)
                return capped_tickets(free, until, first=first, spent=spent["seconds"], cap=cap_seconds)
            db.execute(
                "UPDATE spend SET seconds=seconds+%s, calls=calls+1 WHERE day=%s AND service=%s",
                (seconds, day, budget),
            )
        names, models, kind, sha256, endpoint = ledger_line(free)
        request = got(
            db.execute(
                "INSERT INTO ledger (at, day, service, operation, sha256, seconds, models, outcome, kind, "
                "estimated, endpoint) VALUES (%s, %s, %s, %s, %s, %s, %s, 'sending', %s, %s, %s) RETURNING id",
                (at, day, budget, names, sha256, seconds, models, kind, estimated, endpoint),
            ).fetchone()
        )["id"]
        return sent_tickets(free, holder, int(request))

    @staticmethod
    def _take(
        db: psycopg.Connection[Any], free: list[Takeable], holder: str, until: float, take: str, request: int, at: float
    ) -> None:
        """Take every operation of a charged request: ``sending``, held by ``holder`` until ``until``, its
        generation grown (the fence its ticket names), under the request's ledger line."""
        by_doubt: dict[str, set[tuple[str, str, str, str]]] = {}
        for _, op, _, _ in free:
            by_doubt.setdefault(op.on_doubt, set()).add(op_key(op))
        for on_doubt, keys in by_doubt.items():  # one statement (one policy for every model, as a rule)
            db.execute(
                "UPDATE operations SET state='sending', on_doubt=%s, holder=%s, lease_until=%s, sends=sends+1, "
                "generation=generation+1, take_id=%s, request=%s, "
                f"error=NULL, since=NULL, updated_at=%s WHERE {_any_key(len(keys))}",
                [on_doubt, holder, until, take, request, at, *(v for key in sorted(keys) for v in key)],
            )

    def gate_answered(self, op: Operation, result: str | None = None, *, fence: Fence) -> bool:
        """The service answered the take ``fence`` names: keep its ID so the operation is never sent again, by any
        node. False when that take lost the operation (late): the ID is kept all the same (see the SQLite gate)."""
        return bool(self._run(lambda db: op_answered(db, op, result, fence, remote=True)))

    def gate_release(self, op: Operation, state: str, *, fence: Fence, error: str | None = None) -> bool:
        """No answer: ``open`` (provably not sent), ``reask`` (ask again, counted) or ``in_doubt`` (held). False when
        the take ``fence`` names lost the operation (late): nothing changes."""
        assert state in ("open", "reask", "in_doubt"), state

        def go(db: psycopg.Connection[Any]) -> bool:
            n = db.execute(
                f"UPDATE operations SET state=%s, holder=NULL, lease_until=NULL, error=%s, updated_at={NOW}, "
                f"since=CASE WHEN %s='in_doubt' THEN {NOW} ELSE since END WHERE {KEY_WHERE}{OP_FENCED}",
                (state, text(error), state, *op_key(op), *fence_args(fence)),
            ).rowcount
            adopt_late(db, op)
            return bool(n)

        return bool(self._run(go))

    def gate_get(self, op: Operation) -> dict[str, Any] | None:
        """The operation's row, or None when never taken (an untaken ``open`` placeholder counts as never)."""
        row = self._one(f"SELECT * FROM operations WHERE {KEY_WHERE}", op_key(op))
        if row is None or (row["state"] == "open" and row["sends"] == 0):
            return None
        return dict(row)

    def gate_adopt(self, op: Operation, result: str) -> bool:
        """An ID paid for in another store's life, from a verified record on disk (as the SQLite cache's): answered
        with no ledger line, unless the gate knows the operation (an untaken ``open`` placeholder counts as not)."""
        sql = (
            "INSERT INTO operations (sha256, service, operation, params, on_doubt, state, result, remote_state, sends, "
            f"created_at, updated_at) VALUES (%s, %s, %s, %s, %s, 'answered', %s, 'requested', 0, {NOW}, {NOW}) "
            "ON CONFLICT (sha256, service, operation, params) DO UPDATE SET state='answered', result=excluded.result, "
            "remote_state='requested', updated_at=excluded.updated_at WHERE operations.state='open' "
            "AND operations.sends=0"
        )
        args = (*op_key(op), op.on_doubt, result)
        return bool(self._run(lambda db: db.execute(sql, args).rowcount))

    def gate_resend(self, ops: Sequence[tuple[str, str, str, str]]) -> int:
        """The user's word: in-doubt operations may be sent again; returns how many."""

        def go(db: psycopg.Connection[Any]) -> int:
            return sum(
                db.execute(
                    f"UPDATE operations SET state='reask', updated_at={NOW} WHERE state='in_doubt' AND {KEY_WHERE}",
                    key,
                ).rowcount
                for key in ops
            )

        return int(self._run(go))

    def gate_recover(self, holder: str | None = None) -> int:
        """Operations left ``sending`` (by ``holder``, or by anyone) become in doubt or re-asks."""
        where = "state='sending'" + (" AND holder=%s" if holder else "")
        args: tuple[Any, ...] = (holder,) if holder else ()

        def go(db: psycopg.Connection[Any]) -> int:
            recovered = db.execute(
                f"UPDATE operations SET state={AFTER_CRASH_SQL}, error={AFTER_CRASH_ERROR_SQL}, "
                f"since=CASE {AFTER_CRASH_SQL} WHEN 'in_doubt' THEN {NOW} ELSE since END, holder=NULL, "
                f"lease_until=NULL, updated_at={NOW} WHERE {where} "
                "RETURNING sha256, service, operation, params, late_result",
                args,
            ).fetchall()
            for r in recovered:  # a late answer kept beside one of them answers it
                if r["late_result"] is not None:
                    adopt_late(db, Operation(r["sha256"], r["service"], r["operation"], r["params"]))
            return len(recovered)

        return int(self._run(go))

    def ledger_ending(self, request: int, ending: str) -> None:
        """Record how a request ended; one not paid (UNPAID: not sent, refused) is taken back out of the spend."""

        def go(db: psycopg.Connection[Any]) -> None:
            if ending not in UNPAID:
                db.execute("UPDATE ledger SET outcome=%s WHERE id=%s AND outcome<>%s", (ending, request, ending))
                return
            row = db.execute(
                "UPDATE ledger SET outcome=%s WHERE id=%s AND outcome NOT IN ('not_sent', 'refused') "
                "RETURNING seconds, day, service",
                (ending, request),
            ).fetchone()
            if row is not None:  # it was spent before: the update changed it
                db.execute(
                    "UPDATE spend SET seconds=GREATEST(0, seconds-%s), calls=GREATEST(0, calls-1) "
                    "WHERE day=%s AND service=%s",
                    (row["seconds"], row["day"], row["service"]),
                )

        self._run(go)

    def ledger_settle(self, sha256: str, seconds: float) -> int:
        """The real audio seconds of a content whose lines were charged an estimate (see watcher.store.sqlite.gate)."""

        def go(db: psycopg.Connection[Any]) -> int:
            rows = db.execute(
                "SELECT id, seconds, day, service, outcome FROM ledger WHERE sha256=%s AND estimated FOR UPDATE",
                (sha256,),
            ).fetchall()
            for row in rows:
                db.execute("UPDATE ledger SET seconds=%s, estimated=false WHERE id=%s", (seconds, row["id"]))
                if row["outcome"] not in UNPAID:
                    db.execute(
                        "UPDATE spend SET seconds=GREATEST(0, seconds+%s) WHERE day=%s AND service=%s",
                        (seconds - row["seconds"], row["day"], row["service"]),
                    )
            return len(rows)

        return int(self._run(go))

    def ledger_lines(self, first_day: str, last_day: str) -> list[dict[str, Any]]:
        """Every ledger line of the UTC days ``first_day`` to ``last_day`` (inclusive), oldest first."""
        return self._all("SELECT * FROM ledger WHERE day BETWEEN %s AND %s ORDER BY id", (first_day, last_day))

    def set_remote_state(self, op: Operation, state: str, error: str | None = None) -> None:
        """What the service last said of the object an answered operation created."""
        self._run(
            lambda db: db.execute(
                f"UPDATE operations SET remote_state=%s, remote_error=%s, updated_at={NOW} WHERE {KEY_WHERE}",
                (state, text(error), *op_key(op)),
            )
        )

    def forget_operation(self, op: Operation) -> None:
        """Drop an answered operation whose object the service no longer knows."""
        self._run(lambda db: db.execute(f"DELETE FROM operations WHERE {KEY_WHERE}", op_key(op)))

    def answered_operations(self, sha256: str, service: str) -> set[str]:
        rows = self._all(
            "SELECT operation FROM operations WHERE sha256=%s AND service=%s AND state='answered'", (sha256, service)
        )
        return {r["operation"] for r in rows}

    def in_doubt_operations(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._all("SELECT * FROM operations WHERE state='in_doubt' ORDER BY since")]

    def spend_on(self, day: str) -> dict[str, dict[str, Any]]:
        rows = self._all("SELECT * FROM spend WHERE day=%s", (day,))
        return {
            r["service"]: {"seconds": r["seconds"], "calls": r["calls"], "capped_at": opt_local(self, r["capped_at"])}
            for r in rows
        }

    def adopt_legacy(self, old: str, new: str) -> int:
        """Nothing to adopt: this adapter never had keys from before endpoints were part of them."""
        return 0
