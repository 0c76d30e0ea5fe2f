"""Detection: observers, scans and rescans all feed one entry point, :meth:`Detector.hint`.

A hint is only a hint: the path is filtered, then watched until it settles, then handed to the sink
(which records it in the store). Detection knows nothing of HTTP or of the store's tables.

There is no tick: the loop sleeps until the settler's earliest deadline, a hint, a rescan or a health check,
whichever comes first. The files that settle in one check reach the sink together (one store transaction).

Paths are ``str`` exactly as ``os.fsdecode`` gives them (undecodable bytes as surrogate escapes), so any name
the OS allows goes through. A failure about one path (its filter, stat, ``sink.known``, ``sink.ready``) is
logged once with the displayed name and never leaves the detector. Filesystem calls and the sink's questions
run in a small bounded thread pool: a share that answers slowly slows detection, not the daemon. Only the sink's
``ready``/``ready_many`` (one store transaction per check, then the workers' wake-up) run on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import random
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence

import structlog

from watcher.audiofile import Signature
from watcher.config import FolderConfig
from watcher.detect.failures import FailureLog
from watcher.detect.filters import PathFilter
from watcher.detect.folders import (
    FolderState,
    FsPool,
    Watches,
    absolute_path,
    collector_paused,
    decide_polling_for,
    inside,
    reason_of,
    walk_changed,
)
from watcher.detect.poll import DirPoller
from watcher.detect.scan import Recorded, Sweep
from watcher.detect.settle import Finding, Readiness, Settler
from watcher.detect.sink import ReadySink, Settled
from watcher.errors import Deferred
from watcher.names import display

log = structlog.get_logger("watcher.detect")
HEALTH_EVERY = 5.0
PER_TURN = 1000  # hints or findings handled on the loop before it serves anything else again

__all__ = ["HEALTH_EVERY", "Detector", "ReadySink", "Settled"]  # the sink's types are defined in detect.sink


class Detector:
    """Watches folders and turns every hint into settled files for the sink."""

    def __init__(
        self,
        folders: Sequence[FolderConfig],
        sink: ReadySink,
        *,
        excluded_dirs: Mapping[str, Sequence[str]] | None = None,
        decide_polling: Callable[[FolderConfig], tuple[bool, str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        health_every: float = HEALTH_EVERY,
        seen: Collection[str] | None = None,
        sweep: Sweep | None = None,
    ) -> None:
        """``seen``: the folders that were there before (a store's memory); one of the others that is not there
        is *missing* (never seen: a typo?) rather than *unavailable* (an unmounted share). None: all seen.
        ``sweep``: the start-up sweep, shown the temp files of each folder's first whole walk."""
        self.sink = sink
        self._sweep = sweep
        self.health_every = health_every
        self._clock = clock
        decide = decide_polling or (lambda f: decide_polling_for(str(f.path), f.poll))
        self.folders: dict[str, FolderState] = {}
        for f in folders:
            root = str(f.path)
            extra = (excluded_dirs or {}).get(root, ())
            self.folders[root] = FolderState(
                f, PathFilter(f.include, f.exclude, extra), seen=seen is None or root in seen
            )
        self._lock = threading.Lock()  # held by the one settle check at a time, never by the event loop
        # hints wait here until the next check takes them into the settler: the loop never waits for a check
        # that is stat-ing files on a slow share
        self._hints: collections.deque[tuple[str, float, bool, str, bool]] = collections.deque()
        self._live_dirs: set[str] = set()  # directories hinted live whose scan is still queued
        self.settler = Settler(clock, known=sink.known)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._pending_dirs: set[str] = set()
        self._pool = FsPool()
        self.watches = Watches(
            self.folders,
            self._pool,
            hint=self.hint_threadsafe,
            rescan=self._pending_dirs.add,
            decide=decide,
            health_every=health_every,
        )
        self._failures = FailureLog()  # each path's failure logged once; bounded, a gone path forgotten
        self._report_failure = self._failures.report

    # -- the one entry point -----------------------------------------------------------------------------

    def folder_of(self, path: str) -> FolderState | None:
        best = None
        for root, state in self.folders.items():
            if (path == root or path.startswith(root.rstrip(os.sep) + os.sep)) and (
                best is None or len(root) > len(best.config.path.as_posix())
            ):
                best = state
        return best

    def hint(self, path: str, *, is_dir: bool = False, closed: bool = False, live: bool = False) -> None:
        """Something may have happened at ``path`` (event loop thread only). Never raises. ``live``: it is
        happening now (an event, a poll, `watcher scan PATH`), so what settles there is today's, not backlog;
        a directory hinted live has its files hinted live too."""
        try:
            self._hint(path, is_dir=is_dir, closed=closed, live=live)
        except Exception as exc:
            self._report_failure("detect.hint_failed", path, reason_of(exc), "ignored; the next scan looks again")

    def _hint(self, path: str, *, is_dir: bool, closed: bool, live: bool = False) -> None:
        path = absolute_path(path)
        state = self.folder_of(path)
        if state is None:
            return
        root = str(state.config.path)
        rel = inside(path, root)
        if is_dir:
            if rel == "." or (state.config.recursive and state.filter.wants_dir(rel)):
                self._pending_dirs.add(path)
                if live:
                    self._live_dirs.add(path)
                self._wake.set()
            return
        if rel.startswith("..") or (not state.config.recursive and os.sep in rel):
            return
        if not state.filter.wants_file(rel):
            return
        self._hints.append((path, state.config.settle_seconds, closed, root, live))
        self._wake.set()

    def hint_threadsafe(self, path: str, *, is_dir: bool, closed: bool) -> None:
        """The observers' way in: hop onto the event loop. Events and polls are live, except a whole folder to
        rescan (an overflow, a folder back after an outage): its files are live only when recent."""
        live = not (is_dir and absolute_path(path) in self.folders)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: self.hint(path, is_dir=is_dir, closed=closed, live=live))

    # -- scans ---------------------------------------------------------------------------------------------

    async def scan(
        self,
        root: str | None = None,
        start: str | None = None,
        *,
        asked: dict[str, asyncio.Future[Recorded]] | None = None,
        live: bool = False,
    ) -> int:
        """Hint every wanted file under a folder (or all folders); returns how many were hinted. ``asked``: the
        store's answers for whole folders, already on their way (see :meth:`run`); each is taken out when used."""
        states = [self.folders[root]] if root else list(self.folders.values())
        count = 0
        for state in states:
            folder = str(state.config.path)
            if not await self._pool.isdir(folder):
                continue
            whole = start in (None, folder)
            first = whole and not state.walked  # the start-up scan's walk (or the first since the folder came)
            # a whole folder is compared with the store's one answer for it; a new sub-folder is all new
            if not whole:
                recorded: Recorded = {}
            elif asked is not None and folder in asked:
                recorded = await asked.pop(folder)
            else:
                recorded = await self._recorded(folder, first=first)
            observer = state.watch.observer if state.watch is not None and whole else None
            poller = observer if isinstance(observer, DirPoller) else None
            sweep = self._sweep if first else None
            walk = functools.partial(walk_changed, state, start, recorded, poller, sweep, first=first)
            try:
                paths, seen = await self._pool.call(walk)
            except Exception as exc:
                log.error("scan.failed", folder=display(folder), error=reason_of(exc), next="trying at the next scan")
                continue
            for n, p in enumerate(paths, 1):
                self.hint(p, live=live)
                if n % PER_TURN == 0:
                    await asyncio.sleep(0)  # a first start over 100,000 new files: the page and pulse go on between
            count += len(paths)
            if start is None:
                log.info("scan.done", folder=display(folder), files=seen, new_or_changed=len(paths))
        return count

    async def _recorded(self, folder: str, *, first: bool = True) -> Recorded:
        """The sink's recorded revisions of ``folder`` (off the loop); none when asking fails (every file is
        then hinted and checked one by one, as if new). ``first``: for the folder's first walk (see walk_changed)."""

        def ask() -> Recorded:
            with collector_paused(keep=first):  # a tuple per file: see walk_changed
                return self.sink.recorded(folder)

        try:
            return await self._pool.call(ask)
        except Exception as exc:
            self._report_failure(
                "scan.recorded_failed", folder, reason_of(exc), "checking every file of the folder one by one"
            )
            return {}

    # -- the loop -------------------------------------------------------------------------------------------

    def idle(self) -> bool:
        """True when nothing is waiting to settle and no folder scan is queued."""
        return not self.settler.candidates and not self._pending_dirs and not self._hints

    async def check_once(self) -> float | None:
        """Take the new hints, stat the candidates that are due, hand the settled ones to the sink.

        Returns the next deadline (detection's clock), None when no candidate waits.
        """
        while self._pending_dirs:
            directory = self._pending_dirs.pop()
            live = directory in self._live_dirs
            self._live_dirs.discard(directory)
            state = self.folder_of(directory)
            if state is not None:
                await self.scan(str(state.config.path), start=directory, live=live)

        def check() -> tuple[list[Finding], float | None]:
            with self._lock:
                while self._hints:
                    path, settle, closed, root, live = self._hints.popleft()
                    self.settler.hint(path, settle, closed=closed, root=root, live=live)
                return self.settler.check(), self.settler.next_deadline()

        findings, next_deadline = await self._pool.call(check)
        settled: list[Settled] = []
        for n, finding in enumerate(findings, 1):
            if n % PER_TURN == 0:
                await asyncio.sleep(0)  # a check that settled 100,000 files: the loop serves others between
            path = finding.candidate.path
            if finding.readiness in (Readiness.GONE, Readiness.KNOWN):
                self._failures.forget(path)  # deleted, or recorded already: an old failure there is history
            if finding.readiness == Readiness.GONE:
                log.info("detect.vanished", path=display(path), next="nothing to do: it was deleted before it settled")
            elif finding.readiness == Readiness.SKIPPED:
                self._report_failure("detect.skipped", path, finding.error or "", "not processed")
            elif finding.readiness == Readiness.FAILED:
                self._report_failure(
                    "detect.check_failed", path, finding.error or "", "not processed; the next scan looks again"
                )
            elif finding.readiness == Readiness.READY and finding.signature is not None:
                settled.extend(self._settled(path, finding.signature, live=finding.candidate.live))
        await self._record(settled)
        return next_deadline

    def _settled(self, path: str, sig: Signature, *, live: bool = False) -> list[Settled]:
        """The settled file as the sink takes it (none when its folder is no longer watched). Never raises. It is
        live when hinted live or modified within its folder's ``live_hours`` (a restart keeps today's session)."""
        try:
            state = self.folder_of(path)
            if state is None:
                return []
            recent = time.time() - sig.mtime_ns / 1e9 <= state.config.live_hours * 3600
            return [Settled(state.config, path, inside(path, str(state.config.path)), sig, live or recent)]
        except Exception as exc:
            self._report_failure("detect.record_failed", path, reason_of(exc), "it will be seen again at the next scan")
            return []

    async def _record(self, files: list[Settled]) -> None:
        """Hand the files settled in one check to the sink in one call; if that fails, each file alone, so that
        a failure stays with its file."""
        if len(files) > 1:
            try:
                await self.sink.ready_many(files)
            except Exception as exc:
                log.debug("detect.batch_failed", files=len(files), error=reason_of(exc), next="recording one by one")
            else:
                for f in files:
                    self._failures.forget(f.path)
                return
        for f in files:
            await self._ready(f)

    async def _ready(self, f: Settled) -> None:
        """Hand one settled file to the sink; a failure is this file's alone (a store away: it is looked at again)."""
        try:
            await self.sink.ready(f.folder, f.path, f.rel_path, f.signature, live=f.live)
        except Deferred:
            self.hint(f.path, live=f.live)
        except Exception as exc:
            self._report_failure("detect.record_failed", f.path, reason_of(exc), "seen again at the next scan")
        else:
            self._failures.forget(f.path)

    async def settle_all(self, timeout: float | None = None) -> None:
        """Check at each deadline until every candidate settled or vanished (for `watcher scan`)."""
        deadline = None if timeout is None else self._clock() + timeout
        while not self.idle():
            if deadline is not None and self._clock() > deadline:
                raise TimeoutError("files were still changing")
            self._wake.clear()
            next_deadline = await self.check_once()
            if self.idle() or self._hints or self._pending_dirs:
                continue
            wake_at = self._clock() if next_deadline is None else next_deadline
            if deadline is not None:
                wake_at = min(wake_at, deadline + 0.001)
            await _wait(self._wake, wake_at - self._clock())

    async def run(self, stop: asyncio.Event, on_first_scan: Callable[[], None] | None = None) -> None:
        """Start the observers, scan everything once, then check at each deadline or hint until ``stop`` is set."""
        self._loop = asyncio.get_running_loop()
        waker = asyncio.create_task(self._wake_on(stop))
        try:
            # the store's answer does not depend on the watches: asked while the observers start (in another
            # thread); for the first folder only, so one query at a time uses the pool and one answer the memory
            asked: dict[str, asyncio.Future[Recorded]] = {
                root: asyncio.ensure_future(self._recorded(root)) for root in list(self.folders)[:1]
            }
            try:
                for root in self.folders:  # a poller takes its first snapshot from the scan's walk: one walk, not two
                    await self.watches.ensure(root, seeded=True)
                await self.scan(asked=asked)
            finally:
                self.watches.release_pollers()
                for answer in asked.values():
                    answer.cancel()  # the folder was not there: its answer is not needed
            now = self._clock()
            for state in self.folders.values():
                state.next_rescan = now + state.config.rescan_interval * random.uniform(0.9, 1.1)
            if on_first_scan:
                on_first_scan()
            next_health = self._clock() + self.health_every
            while not stop.is_set():
                self._wake.clear()
                next_deadline = await self.check_once()
                now = self._clock()
                if now >= next_health:
                    await self.watches.health()
                    next_health = self._clock() + self.health_every
                for root, state in self.folders.items():
                    if now >= state.next_rescan and state.available:
                        state.next_rescan = now + state.config.rescan_interval * random.uniform(0.9, 1.1)
                        await self.scan(root)
                if stop.is_set():
                    break
                if self._hints or self._pending_dirs:
                    continue  # hints came while checking (a scan's, or events'): take them now
                # an unavailable folder's rescan waits for the health check that finds it back
                wake_at = min([next_health, *(s.next_rescan for s in self.folders.values() if s.available)])
                if next_deadline is not None:
                    wake_at = min(wake_at, next_deadline)
                await _wait(self._wake, wake_at - self._clock())  # a hint or ``stop`` wakes it sooner
        finally:
            waker.cancel()
            await self.watches.stop_all()
            self._pool.shutdown()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    def describe(self) -> list[dict[str, object]]:
        """Per-folder watch mode and availability, for status and logs."""
        return self.watches.describe()


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds (no task is created for the wait)."""
    if event.is_set() or timeout <= 0:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
