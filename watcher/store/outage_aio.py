"""The outage rules on the event loop's side of the asynchronous port (the rules themselves: watcher.store.outage).

A store that is away can hold each call for as long as the adapter's bounds allow (PostgreSQL's pool waits up to
30 s for a connection). While the guard knows the store is away, a call that would only wait for it never queues
for the store's threads: claims answer nothing, upkeep is skipped, a release is held, a settled file waits to be
recorded, other calls wait as StoreAway, and a paid answer goes straight to the journal. When the store is due to
be tried again, one call alone goes through as the probe (the guard replays the journal first, in its thread).
A paid answer reaches the store or the journal within ``answer_seconds`` whatever the store's threads are doing.
With PostgreSQL, whose pool waits for a connection rather than failing, any call unanswered for ``slow_seconds``
says the store is away (the call itself is never abandoned: its caller waits on).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

from watcher.fsutil import write_json_atomic
from watcher.store.aio import AsyncStore, Guard, unguarded
from watcher.store.away import OUTAGE_FILE, StoreAway, unavailable
from watcher.store.journal import JOURNAL_NAME, Journal
from watcher.store.outage import JOURNALLED, RETRY_FIRST, UPKEEP, OutageGuard, iso_time, log
from watcher.store.ports import StorePort

P = ParamSpec("P")
T = TypeVar("T")
SLACK = 0.5  # seconds over the guard's own wait for a paid answer, for the hop to the store's thread
START_RETRY_MAX = 30.0  # at start, the longest wait between two tries to open the store
SLOW_SECONDS = 5.0  # a shared store's call unanswered this long means it is away (its pool waits, not fails)
WAIT_FOR_STORE = ("register_revision", "register_revisions")  # these wait for the store to be back
WAIT_POLL = 0.05  # the shortest wait for a probe to end or fall due


class OutageStore(AsyncStore):
    """The asynchronous port over an :class:`OutageGuard` (which is its ``sync`` store too)."""

    def __init__(
        self, outage: OutageGuard, *, threads: int = 1, guard: Guard = unguarded, slow_seconds: float | None = None
    ) -> None:
        """``slow_seconds``: a call unanswered this long means the store is away (its caller waits on); None: only
        an error says so (SQLite, whose calls queue behind each other in one thread)."""
        super().__init__(cast(StorePort, outage), threads=threads, guard=guard)
        self.outage = outage
        self.slow_seconds = slow_seconds
        self._probe: asyncio.Future[Any] | None = None
        self._probe_ended = asyncio.Event()

    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn`` (a method of the guard) off the loop, under the rules of the module docstring."""
        name = fn.__name__
        outage = self.outage
        while name in WAIT_FOR_STORE and self._away():  # a settled file waits to be recorded, never dropped
            self._probe_ended.clear()
            with contextlib.suppress(TimeoutError):  # woken when a probe ends, or when a new one is due
                await asyncio.wait_for(self._probe_ended.wait(), max(WAIT_POLL, outage.retry_in()))
        if self._away():
            return cast(T, await self._while_away(name, args, kwargs))
        task: asyncio.Future[T] = asyncio.ensure_future(super().call(fn, *args, **kwargs))
        if outage.down:  # due to be tried again: this call is the probe, the others keep away until it ends
            self._probe = task
            task.add_done_callback(self._probed)
        if name not in JOURNALLED:
            if self.slow_seconds is not None and not (await asyncio.wait({task}, timeout=self.slow_seconds))[0]:
                outage.failed(TimeoutError(f"the store has not answered for {self.slow_seconds:g} s"))
            return await task
        try:
            return await asyncio.wait_for(asyncio.shield(task), outage.answer_seconds + SLACK)
        except TimeoutError:
            outage.failed(TimeoutError(f"a paid answer waited {outage.answer_seconds + SLACK:g} s for the store"))
            # the call still queued for the store's threads lands later or is journalled again: both change nothing
            return cast(T, await self._while_away(name, args, kwargs))

    def known_away(self) -> StoreAway | None:
        """Why a command cannot use the store now, when it is known to be away (None: it may be asked): a command
        answers at once instead of being the probe that waits out the pool's deadline (30 s)."""
        return self.outage.away() if self.outage.down else None

    def _away(self) -> bool:
        """Whether calls keep away from the store now (it is away, or a probe is under way)."""
        return self.outage.waiting() or (self.outage.down and self._probe is not None)

    def _probed(self, task: asyncio.Future[Any]) -> None:
        """A probe ended: the next call may probe again, and waiting registrations look again."""
        if self._probe is task:
            self._probe = None
        self._probe_ended.set()
        if not task.cancelled():
            task.exception()  # its caller reads it; marked read here for a probe whose caller gave up

    async def _while_away(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What a call gets while the store is away (see the module docstring)."""
        outage = self.outage
        if name in JOURNALLED:
            await asyncio.to_thread(outage.keep, name, args, kwargs)
            return None if name == "ledger_ending" else True
        if name == "claim":
            return None
        if name == "release":
            outage.hold(args[0], kwargs)
            return None
        if name == "open_counts":
            return outage.last_counts()
        if name in UPKEEP:
            return UPKEEP[name]
        raise outage.away()


def outage_store(
    store: StorePort, state_dir: Path, *, shared: bool, threads: int = 1, guard: Guard = unguarded
) -> OutageStore:
    """``store``'s asynchronous port for a daemon: its outages survived, the journal and what status shows in
    ``state_dir``. A ``shared`` store (PostgreSQL) counts as away after SLOW_SECONDS unanswered."""
    shown = str(getattr(store, "where", None) or getattr(store, "path", "the store"))  # for the log only
    outage = OutageGuard(store, Journal(state_dir / JOURNAL_NAME), where=shown, state_file=state_dir / OUTAGE_FILE)
    return OutageStore(outage, threads=threads, guard=guard, slow_seconds=SLOW_SECONDS if shared else None)


async def wait_for_store(open_it: Callable[[], None], state_dir: Path, stop: asyncio.Event) -> bool:
    """At start, until ``open_it`` (open the store and close it) succeeds, tried off the loop at growing intervals:
    the store is away as a running daemon says it (log and status). False when ``stop`` is set first."""
    delay, since = RETRY_FIRST, 0.0
    # answers an earlier life journalled, waiting for the store too
    journalled = len(Journal(state_dir / JOURNAL_NAME)) if (state_dir / JOURNAL_NAME).exists() else 0
    while True:
        try:
            await asyncio.to_thread(open_it)
        except Exception as exc:
            if not unavailable(exc):
                raise
            error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            nxt = f"claims paused; {journalled} answers journalled; retrying in {delay:.0f} s"
            if not since:
                since = time.time()
                log.warning("store.unreachable", error=error, next=f"nothing starts until it answers; {nxt}")
            shown = {"unreachable_since": iso_time(since), "error": error, "journalled": journalled, "next": nxt}
            with contextlib.suppress(OSError):
                write_json_atomic(state_dir / OUTAGE_FILE, shown | {"pid": os.getpid()})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                (state_dir / OUTAGE_FILE).unlink(missing_ok=True)
                return False
            delay = min(START_RETRY_MAX, delay * 2)
            continue
        if since:
            (state_dir / OUTAGE_FILE).unlink(missing_ok=True)
            log.info("store.back", unreachable_for=round(time.time() - since, 1), next="starting")
        return True
