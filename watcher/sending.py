"""The ticket that lets a paid call's request leave this machine, and tells whether it did.

The gate owns the wire: a request to a paid endpoint leaves only with a :class:`WireTicket` the gate issued for
it (one take: one ledger line, exactly the operations it covers). The HTTP policy spends the ticket as the
request is handed over; a second request on the same ticket (a retry below the gate) is refused with
:class:`NoTicket` before a byte is sent. The one paid-endpoint request without a ticket is the key check
(``doctor``), which carries no audio and no model and is sent as a probe.

A spent ticket is the paid call's record that its request was handed to the transport: a call stopped before
(waiting for its concurrency slot, its turn in the rate, a Retry-After) left its ticket unused, provably sent
nothing, and its gate operation is freed rather than held in doubt (:func:`watcher.pipelines.paid.ending_of`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from contextvars import ContextVar
from dataclasses import dataclass, field

_TICKET: ContextVar[WireTicket | None] = ContextVar("watcher_wire_ticket", default=None)


class NoTicket(RuntimeError):
    """A paid request was about to be sent without a fresh ticket from the gate: a bug, never sent."""


@dataclass
class WireTicket:
    """The gate's leave for one request: its ledger line and exactly the operations it covers; used once, as the
    request is handed to the transport (``used``: it may have been sent)."""

    request: int
    operations: tuple[str, ...]
    used: bool = field(default=False)
    # A body sent on it has not yet handed over its last piece: a request stopped now (a stop, a cut connection)
    # cannot have reached the service whole, so it provably sent nothing billable (see :func:`whole_body`).
    partial_body: bool = field(default=False)


def issue(ticket: WireTicket) -> WireTicket:
    """The gate: this task (and the tasks it starts from now on) may send one request on ``ticket``."""
    _TICKET.set(ticket)
    return ticket


def spend_ticket(what: str, covers: Collection[str] | None = None) -> WireTicket:
    """The HTTP policy, before a paid request is handed over: use the current ticket, or raise NoTicket.

    ``covers``: the operations the request carries (the analysis stream's models), which must be exactly the
    ticket's; a ticket already used (a re-send) or missing refuses the request.
    """
    ticket = _TICKET.get()
    if ticket is None:
        raise NoTicket(f"{what}: a paid request without a ticket from the gate was refused before sending")
    if ticket.used:
        raise NoTicket(
            f"{what}: a paid request was about to be sent again on ticket {ticket.request}; a retry is a new take"
        )
    if covers is not None and set(covers) != set(ticket.operations):
        raise NoTicket(
            f"{what}: the request covers {sorted(covers)} but its ticket {ticket.request} names "
            f"{sorted(ticket.operations)}"
        )
    ticket.used = True
    return ticket


def body_started(size: int) -> WireTicket | None:
    """A request body of ``size`` bytes begins on the current ticket (None: no ticket, a free request): it is
    partial until :func:`body_ending` is called just before its last piece is handed over."""
    ticket = _TICKET.get()
    if ticket is not None:
        ticket.partial_body = size > 0
    return ticket


def body_ending(ticket: WireTicket | None) -> None:
    """The body's last piece is about to be handed over: from now on the service may receive it whole."""
    if ticket is not None:
        ticket.partial_body = False


async def whole_body(chunks: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
    """``chunks`` (``size`` bytes in all) as a request body that keeps its ticket's ``partial_body`` true until
    the piece that completes it is asked for: a request cut before then is known not to have been sent.

    Its last byte is its own piece, asked for only once all before it was taken (a bandwidth limit takes a piece
    first and sends it later): until then the service cannot hold the whole body, whoever holds the pieces."""
    ticket = body_started(size)
    sent = 0
    async for chunk in chunks:
        sent += len(chunk)
        if sent < size:
            yield chunk
            continue
        if len(chunk) > 1:
            yield chunk[:-1]
        body_ending(ticket)
        yield chunk[-1:]
