"""Whether the current paid call's request has left this machine, told by the HTTP policy to the paid-call gate.

A paid call stopped before its request reached the transport (waiting for its concurrency slot, its turn in the
rate, a Retry-After) provably sent nothing, so its gate operation is freed rather than held in doubt. The flag
lives in a context variable: each task (each paid call) sees its own.
"""

from __future__ import annotations

from contextvars import ContextVar

_HANDED_OVER: ContextVar[bool] = ContextVar("watcher_request_handed_over", default=False)


def expect_sending() -> None:
    """Mark the start of a paid call in this task: nothing has been handed to the transport yet."""
    _HANDED_OVER.set(False)


def mark_handed_over(sent: bool = True) -> None:
    """The HTTP policy: a request is handed to the transport (``sent=False``: it was provably not processed)."""
    _HANDED_OVER.set(sent)


def handed_over() -> bool:
    """True once a request of this task's current paid call reached the transport (it may have been sent)."""
    return _HANDED_OVER.get()
