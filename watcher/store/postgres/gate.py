"""The paid-operation gate and spend ledger in PostgreSQL: one transaction under the operation's key."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from watcher.names import text
from watcher.store.gate import (
    UNPAID,
    WAIT_SECONDS,
    capped_tickets,
    ledger_kind,
    next_utc_midnight,
    own_ticket,
    replayed,
    utc_day,
)
from watcher.store.models import Fence, Operation, Ticket
from watcher.store.postgres.base import (
    adopt_late,
    fence_args,
    got,
    op_answered,
    op_key,
    opt_local,
    set_op_state,
)
from watcher.store.postgres.schema import KEY_WHERE, NOW, OP_FENCED

if TYPE_CHECKING:
    from watcher.store.postgres.base import PgBase as _Base
else:
    _Base = object


# Operation keys in the order Python sorts them (code points: the "C" collation), the order rows are locked in.
_IN_KEY_ORDER = ", ".join(f'{c} COLLATE "C"' for c in ("sha256", "service", "operation", "params"))


def _any_key(count: int) -> str:
    """A condition matching any of ``count`` operation keys (one primary-key search each)."""
    return " OR ".join([f"({KEY_WHERE})"] * count)


def op_key_of(row: Any) -> tuple[str, str, str, str]:
    """An operations row's key, as :func:`op_key` gives an Operation's."""
    return (row["sha256"], row["service"], row["operation"], row["params"])


class PgGateMixin(_Base):
    """The gate (same states as watcher.store.gate)."""

    # -- the gate (same states as watcher.store.gate) ----------------------------------------------------

    def gate_take(
        self,
        ops: Sequence[Operation],
        owner: str,
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
            takeable: list[tuple[int, Operation, bool, int]] = []
            keys = sorted({op_key(op): op for op in ops}.items())  # a fixed lock order: no deadlock between takers
            db.execute(
                "INSERT INTO operations (sha256, service, operation, params, on_doubt, state, created_at, updated_at) "
                f"VALUES {','.join(['(%s, %s, %s, %s, %s, %s, %s, %s)'] * len(keys))} ON CONFLICT DO NOTHING",
                [v for key, op in keys for v in (*key, op.on_doubt, "open", at, at)],
            )
            rows = {
                op_key_of(r): r
                for r in db.execute(
                    f"SELECT * FROM operations WHERE {_any_key(len(keys))} "
                    f"ORDER BY {_IN_KEY_ORDER} FOR UPDATE",  # locked in the same order as inserted
                    [v for key, _ in keys for v in key],
                ).fetchall()
            }
            for i, op in enumerate(ops):
                row = rows[op_key(op)]
                state = row["state"]
                if replayed(row, take):
                    tickets[i] = own_ticket(op, row)
                    continue
                if state == "sending" and (row["lease_until"] or 0) < at:
                    state = "in_doubt" if op.on_doubt == "hold" else "reask"  # its sender died mid-call
                    set_op_state(db, op, state, at, error="the daemon stopped while the request was in flight")
                    row = got(db.execute(f"SELECT * FROM operations WHERE {KEY_WHERE}", op_key(op)).fetchone())
                    state = row["state"]  # a late answer kept beside it makes it answered
                if state == "answered":
                    tickets[i] = Ticket("answered", op, result=row["result"])
                elif state == "sending":
                    tickets[i] = Ticket("wait", op, until=local_now + WAIT_SECONDS, holder=row["holder"])
                elif state == "in_doubt" and not resend_in_doubt:
                    since = None if row["since"] is None else local_now - (at - row["since"])
                    tickets[i] = Ticket("in_doubt", op, since=since, error=row["error"])
                else:
                    takeable.append((i, op, state in ("reask", "in_doubt"), int(row["generation"]) + 1))
            if takeable:
                tickets.update(charge(db, takeable, at))
            return [tickets[i] for i in range(len(ops))]

        def charge(
            db: psycopg.Connection[Any], takeable: list[tuple[int, Operation, bool, int]], at: float
        ) -> dict[int, Ticket]:
            """The day's cap checked (its spend row locked) and, within it, the ledger line and every take."""
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
                if spent["seconds"] + seconds > cap_seconds:
                    first = spent["capped_at"] is None
                    if first:
                        db.execute("UPDATE spend SET capped_at=%s WHERE day=%s AND service=%s", (at, day, budget))
                    until = local_now + (next_utc_midnight(at) - at)
                    return capped_tickets(takeable, until, first, spent["seconds"], cap_seconds)
                db.execute(
                    "UPDATE spend SET seconds=seconds+%s, calls=calls+1 WHERE day=%s AND service=%s",
                    (seconds, day, budget),
                )
            request = got(
                db.execute(
                    "INSERT INTO ledger (at, day, service, operation, sha256, seconds, models, outcome, kind, "
                    "estimated, endpoint) VALUES (%s, %s, %s, %s, %s, %s, %s, 'sending', %s, %s, %s) RETURNING id",
                    (
                        at,
                        day,
                        budget,
                        ",".join(op.name for _, op, _, _ in takeable),
                        takeable[0][1].sha256,
                        seconds,
                        sum(op.name.startswith("analyze:") for _, op, _, _ in takeable),
                        ledger_kind(takeable),
                        estimated,
                        takeable[0][1].service,
                    ),
                ).fetchone()
            )["id"]
            by_doubt: dict[str, set[tuple[str, str, str, str]]] = {}
            for _, op, _, _ in takeable:
                by_doubt.setdefault(op.on_doubt, set()).add(op_key(op))
            for on_doubt, keys in by_doubt.items():  # one statement (one policy for every model, as a rule)
                db.execute(
                    "UPDATE operations SET state='sending', on_doubt=%s, holder=%s, lease_until=%s, sends=sends+1, "
                    "generation=generation+1, take_id=%s, request=%s, "
                    f"error=NULL, since=NULL, updated_at=%s WHERE {_any_key(len(keys))}",
                    [on_doubt, owner, at + lease, take, request, at, *(v for key in sorted(keys) for v in key)],
                )
            return {
                i: Ticket("send", op, resend=resend, request=int(request), fence=Fence(owner, generation))
                for i, op, resend, generation in takeable
            }

        return self._run(go)

    def gate_answered(self, op: Operation, result: str | None = None, *, fence: Fence) -> bool:
        """The service answered the take ``fence`` names: keep its ID so the operation is never sent again, by any
        node. False when that take lost the operation (late): the ID is kept all the same (see watcher.store.gate)."""
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
                "UPDATE operations SET state=CASE on_doubt WHEN 'hold' THEN 'in_doubt' ELSE 'reask' END, "
                f"since=CASE on_doubt WHEN 'hold' THEN {NOW} ELSE since END, holder=NULL, lease_until=NULL, "
                f"error='the daemon stopped while the request was in flight', updated_at={NOW} WHERE {where} "
                "RETURNING sha256, service, operation, params, late_result",
                args,
            ).fetchall()
            for r in recovered:  # a late answer kept beside one of them answers it
                if r["late_result"] is not None:
                    adopt_late(db, Operation(r["sha256"], r["service"], r["operation"], r["params"]))
            return len(recovered)

        return int(self._run(go))

    def ledger_outcome(self, request: int, outcome: str) -> None:
        """Record how a request ended; one not paid (UNPAID: not sent, refused) is taken back out of the spend."""

        def go(db: psycopg.Connection[Any]) -> None:
            if outcome not in UNPAID:
                db.execute("UPDATE ledger SET outcome=%s WHERE id=%s AND outcome<>%s", (outcome, request, outcome))
                return
            row = db.execute(
                "UPDATE ledger SET outcome=%s WHERE id=%s AND outcome NOT IN ('not_sent', 'refused') "
                "RETURNING seconds, day, service",
                (outcome, request),
            ).fetchone()
            if row is not None:  # it was spent before: the update changed it
                db.execute(
                    "UPDATE spend SET seconds=GREATEST(0, seconds-%s), calls=GREATEST(0, calls-1) "
                    "WHERE day=%s AND service=%s",
                    (row["seconds"], row["day"], row["service"]),
                )

        self._run(go)

    def ledger_settle(self, sha256: str, seconds: float) -> int:
        """The real audio seconds of a content whose lines were charged an estimate (see watcher.store.gate)."""

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
