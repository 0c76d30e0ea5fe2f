"""Surviving a store outage: every store call of the daemon passes :class:`OutageGuard`.

When the store counts as away is watcher.store.away's :func:`unavailable` (PostgreSQL unreachable or shut down;
SQLite locked, read-only or out of disk); any other error is the caller's, as before. While the store is away:

- claims pause (``claim`` and ``next_due`` answer "nothing"), leases are not renewed, upkeep is skipped;
- a paid answer (``gate_answered``, ``gate_release``, ``save_result``, ``ledger_ending``) the store does not take
  within ``answer_seconds`` goes to the journal (watcher.store.journal) and counts as kept; a job's ``release`` is
  held in memory; any other call raises :class:`StoreAway` (a Deferred: the job waits, no attempt counted);
- no new paid call starts (``gate_take``) while an answer could not be written anywhere, or the journal is full.

The store is tried again after a growing pause (1 s, doubling, at most ``retry_max``). Before any call goes through
again, the journal is replayed into the store (each ending with the fence its take was given, so a late one
changes nothing), then the held releases: only then is anything claimed. Replay is idempotent: a record applied
twice (a kill between replay and clearing the journal, or a slow call that landed after it was journalled) leaves
the same state. watcher.store.outage_aio applies the same rules on the event loop's side of the asynchronous port.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from watcher.fsutil import write_json_atomic
from watcher.store.away import StoreAway, unavailable
from watcher.store.journal import Journal, apply, encode
from watcher.store.models import Job
from watcher.store.rules import LeaseLost

log = structlog.get_logger("watcher.store")
RETRY_FIRST = 1.0
RETRY_MAX = 2.0
ANSWER_SECONDS = 1.0
REMIND_EVERY = 30.0  # seconds between two log lines saying the store is still unreachable
JOURNALLED = ("gate_answered", "gate_release", "save_result", "ledger_ending")
# upkeep skipped while the store is away, and what it answers then
UPKEEP: dict[str, Any] = {"renew": None, "heartbeat": None, "set_folder_health": None, "prune": 0, "next_due": None}


def iso_time(t: float) -> str:
    """A Unix time as status shows it (UTC, to the second)."""
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class OutageGuard:
    """The store as the daemon uses it: the same calls, surviving an outage of any length (see the module)."""

    def __init__(
        self,
        store: Any,
        journal: Journal,
        *,
        retry_max: float = RETRY_MAX,
        answer_seconds: float = ANSWER_SECONDS,
        where: str = "the store",
        state_file: Path | None = None,
    ) -> None:
        self._store = store
        self.state_file = state_file  # where `watcher status` reads the outage (None: nowhere)
        self.journal = journal
        self.where = where
        self.retry_max = retry_max
        self.answer_seconds = answer_seconds  # how long a paid answer waits for the store before the journal takes it
        self._answers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store-answers")
        self._lock = threading.RLock()  # the state below; never held while the store is asked
        self._replaying = threading.Lock()
        self._down_since: float | None = None
        self._error = ""
        self._delay = RETRY_FIRST
        self._retry_at = 0.0  # monotonic: when the store is tried again
        self._reminded = 0.0
        self._held: dict[int, tuple[Job, dict[str, Any]]] = {}  # job ID -> its release, made when the store is back
        self._unrecorded: list[dict[str, Any]] = []  # answers the journal could not take either
        self._counts: dict[str, dict[str, int]] = {}
        self._claims_paused = False
        if len(journal):
            log.info(
                "store.journal_found",
                journal=str(journal.path),
                answers=len(journal),
                torn_bytes=journal.dropped_tail,
                next="replaying them into the store before anything is claimed",
            )

    # -- what status and the log say --------------------------------------------------------------------

    def describe(self) -> dict[str, Any] | None:
        """None while the store is reachable; else since when it is not, why, and what waits for it."""
        with self._lock:
            if self._down_since is None:
                return None
            return {
                "unreachable_since": iso_time(self._down_since),
                "error": self._error,
                "journalled": len(self.journal) + len(self._unrecorded),
                "held_releases": len(self._held),
                "retrying_in": round(max(0.0, self._retry_at - time.monotonic()), 1),
            }

    def _tell(self) -> None:
        """Write what status shows (atomically); a state folder that cannot be written only loses that."""
        if self.state_file is None:
            return
        doc = self.describe()
        with contextlib.suppress(OSError):
            if doc is None:
                self.state_file.unlink(missing_ok=True)
            else:
                write_json_atomic(self.state_file, doc | {"pid": os.getpid(), "next": self._next()})

    def _next(self) -> str:
        """What happens next, as the log and status say it."""
        answers = len(self.journal) + len(self._unrecorded)
        wait = max(0.0, self._retry_at - time.monotonic())
        return f"claims paused; {answers} answers journalled; retrying in {wait:.0f} s"

    # -- the state machine ----------------------------------------------------------------------------

    def failed(self, exc: BaseException) -> None:
        """The store just failed us: note it, say it once (then every REMIND_EVERY), and wait before trying again."""
        with self._lock:
            now = time.monotonic()
            first = self._down_since is None
            if first:
                self._down_since, self._delay, self._reminded = time.time(), RETRY_FIRST, now
            else:
                self._delay = min(self.retry_max, self._delay * 2)
            self._error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self._retry_at = now + self._delay
            self._claims_paused = True
            if first:
                log.warning("store.unreachable", store=self.where, error=self._error, next=self._next())
                self._tell()
            elif now - self._reminded >= REMIND_EVERY:
                self._reminded = now
                since = iso_time(self._down_since or time.time())
                log.warning(
                    "store.still_unreachable", store=self.where, since=since, error=self._error, next=self._next()
                )
                self._tell()

    @property
    def down(self) -> bool:
        """Whether the store is away (since the last failure, until a replay went through)."""
        return self._down_since is not None

    def _open(self) -> bool:
        """Whether calls may go to the store now; what waits for it (journal, held releases) is replayed first.
        One thread replays at a time; the state lock is never held while the store is asked (the loop takes it)."""
        if self._down_since is None and not self._unrecorded and not self._held and not len(self.journal):
            return True
        if time.monotonic() < self._retry_at:
            return False
        with self._replaying:
            if self._down_since is None and not self._unrecorded and not self._held and not len(self.journal):
                return True  # another thread replayed meanwhile
            return self._replay()

    def _replay(self) -> bool:
        """Apply the journal, then the held releases; False (the store away again) when that fails midway."""
        records = self.journal.records()
        with self._lock:
            unrecorded = list(self._unrecorded)
            held = list(self._held.items())
        started = time.time()
        late = 0
        try:
            for record in [*records, *unrecorded]:
                if not self._apply(record):
                    late += 1
                    log.info(
                        "store.replay_unchanged",
                        kind=record["kind"],
                        operation=(record.get("op") or [None, None, None])[2],
                        sha256=(record.get("op") or [None])[0],
                        next="applied already, or its take lost the operation: the store's state stands",
                    )
            for job_id, (job, kwargs) in held:
                self._release_held(job_id, job, kwargs)
        except Exception as exc:
            if not unavailable(exc):
                raise
            self.failed(exc)
            return False
        self.journal.clear(len(records))
        with self._lock:
            del self._unrecorded[: len(unrecorded)]
            for job_id, (job, _) in held:
                if self._held.get(job_id, (None,))[0] is job:
                    del self._held[job_id]
            down, self._down_since = self._down_since, None
        self._tell()
        if records or unrecorded or down is not None:
            log.info(
                "store.replayed",
                store=self.where,
                answers=len(records) + len(unrecorded),
                releases=len(held),
                unchanged=late,  # applied already (by a call that landed late), or late: their take lost the operation
                seconds=round(time.time() - started, 3),
                unreachable_for=None if down is None else round(time.time() - down, 1),
                next="claims resume",
            )
        return True

    def _apply(self, record: dict[str, Any]) -> bool:
        """One record into the store; one the store refuses for another reason is logged and skipped."""
        try:
            return apply(self._store, record)
        except Exception as exc:
            if unavailable(exc):
                raise
            log.error("store.replay_failed", record=record, error=repr(exc), next="skipping this record")
            return True

    def _release_held(self, job_id: int, job: Job, kwargs: dict[str, Any]) -> None:
        """One held release; a job another node took meanwhile keeps its new state."""
        try:
            self._store.release(job, **kwargs)
        except LeaseLost:
            pass  # another node took it meanwhile: its state stands
        except Exception as exc:
            if unavailable(exc):
                raise
            log.error("store.release_failed", job=job_id, error=repr(exc), next="its lease runs out instead")

    def keep(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A paid answer the store cannot take now: into the journal (or, failing that, memory and no new takes)."""
        record = encode(name, args, kwargs) | {"at": round(time.time(), 3)}
        try:
            self.journal.append(record)
        except OSError as exc:
            with self._lock:
                self._unrecorded.append(record)
            log.error(
                "store.journal_failed",
                journal=str(self.journal.path),
                error=str(exc),
                next="kept in memory; no new paid call starts until it is recorded",
            )
            return
        log.info(
            "store.journalled", kind=name, journal=str(self.journal.path), answers=len(self.journal), next=self._next()
        )
        self._tell()

    # -- the calls --------------------------------------------------------------------------------------

    def _call(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Every other call: journalled, upkeep, or through (StoreAway while the store is away)."""
        if name in JOURNALLED:
            return self._answer(name, fn, args, kwargs)
        if name in UPKEEP:
            if self._open():
                try:
                    return fn(*args, **kwargs)
                except Exception as exc:
                    if not unavailable(exc):
                        raise
                    self.failed(exc)
            return UPKEEP[name]
        if not self._open():
            raise self.away()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not unavailable(exc):
                raise
            self.failed(exc)
            raise self.away() from None

    def _answer(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A paid answer: into the store within ``answer_seconds``, else into the journal. A store call that took
        longer may still land after it was journalled: replaying it then changes nothing."""
        if self._open():
            future = self._answers.submit(fn, *args, **kwargs)
            try:
                return future.result(timeout=self.answer_seconds)
            except TimeoutError:
                self.failed(TimeoutError(f"a paid answer was not taken within {self.answer_seconds:g} s"))
            except Exception as exc:
                if not unavailable(exc):
                    raise
                self.failed(exc)
        self.keep(name, args, kwargs)
        return None if name == "ledger_ending" else True

    def away(self) -> StoreAway:
        """The error a caller gets instead of waiting for the store."""
        return StoreAway(
            f"the store is unreachable ({self._error})",  # each caller says what it does meanwhile
            until=time.time() + max(RETRY_FIRST, self._retry_at - time.monotonic()),
        )

    def __getattr__(self, name: str) -> Any:
        """Every port method not written out here, through :meth:`_call`; plain attributes as they are."""
        value = getattr(self._store, name)
        if name.startswith("_") or not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            """The port method ``name``, guarded."""
            return self._call(name, value, args, kwargs)

        call.__name__ = name  # the asynchronous port and its guard know a call by its name
        return call

    def claim(self, pipeline: str, holder: str, **kwargs: Any) -> Job | None:
        """A due job, or None (also while the store is away: claims pause)."""
        if not self._open():
            return None
        try:
            job: Job | None = self._store.claim(pipeline, holder, **kwargs)
        except Exception as exc:
            if not unavailable(exc):
                raise
            self.failed(exc)
            return None
        if job is not None and self.down:  # asked before the outage was noticed, answered since: it waits for
            self.hold(job, {"next_attempt_at": time.time(), "error": job.last_error, "error_code": job.error_code})
            return None  # the replay, and is given back right after it
        if job is not None and self._claims_paused:
            self._claims_paused = False
            log.info("store.claims_resumed", pipeline=pipeline, path=job.file.path, job=job.id)
        return job

    def retry_in(self) -> float:
        """Seconds until the store is due to be tried again (0: now)."""
        return max(0.0, self._retry_at - time.monotonic())

    def waiting(self) -> bool:
        """Whether the store is away and not due to be tried yet (no call should wait for it now)."""
        return self._down_since is not None and time.monotonic() < self._retry_at

    def hold(self, job: Job, kwargs: dict[str, Any]) -> None:
        """Keep a job's release until the store is back (made after the journal is replayed)."""
        with self._lock:
            self._held[job.id] = (job, kwargs)

    def last_counts(self) -> dict[str, dict[str, int]]:
        """The queue's counts as last read."""
        return dict(self._counts)

    def release(self, job: Job, **kwargs: Any) -> None:
        """Give the job back; while the store is away, held here and made once the journal is replayed."""
        if self._open():
            try:
                self._store.release(job, **kwargs)
                return
            except Exception as exc:
                if not unavailable(exc):
                    raise
                self.failed(exc)
        self.hold(job, kwargs)

    def open_counts(self) -> dict[str, dict[str, int]]:
        """The queue's counts; while the store is away, the last ones known."""
        if self._open():
            try:
                self._counts = self._store.open_counts()
            except Exception as exc:
                if not unavailable(exc):
                    raise
                self.failed(exc)
        return dict(self._counts)

    def gate_take(self, ops: Any, holder: str, **kwargs: Any) -> Any:
        """The gate's take; refused (the job waits) while an answer could not be recorded or the journal is full."""
        if self._unrecorded or self.journal.full:
            why = "answers wait in memory for the store" if self._unrecorded else "the outage journal is full"
            raise StoreAway(f"no new paid call: {why}", until=time.time() + RETRY_FIRST)
        return self._call("gate_take", self._store.gate_take, (ops, holder), kwargs)

    def close(self) -> None:
        """Close the journal and the store (what the journal holds waits for the next start)."""
        self._answers.shutdown(wait=False)
        if self.state_file is not None:  # a daemon that stopped says nothing about its store any more
            with contextlib.suppress(OSError):
                self.state_file.unlink(missing_ok=True)
        self.journal.close()
        self._store.close()
