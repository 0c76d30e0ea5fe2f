"""Detection: observers, scans and rescans all feed one entry point, :meth:`Detector.hint`.

A hint is only a hint: the path is filtered, then watched until it settles, then handed to the sink
(which records it in the store). Detection knows nothing of HTTP or of the store's tables.

Paths are ``str`` exactly as ``os.fsdecode`` gives them (undecodable bytes as surrogate escapes), so any name
the OS allows goes through. A failure about one path (its filter, stat, ``sink.known``, ``sink.ready``) is
logged once with the displayed name and never leaves the detector. Every filesystem call runs in a small
bounded thread pool, never on the event loop: a share that answers slowly slows detection, not the daemon.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import random
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import structlog

from watcher.audiofile import Signature
from watcher.config import FolderConfig
from watcher.detect.filters import PathFilter
from watcher.detect.fstype import decide_polling as decide_polling_for_type
from watcher.detect.fstype import filesystem_type
from watcher.detect.scan import walk
from watcher.detect.settle import Settler, Verdict
from watcher.detect.watch import FolderWatch, start_watch
from watcher.names import display

log = structlog.get_logger("watcher.detect")
TICK = 0.25
HEALTH_EVERY = 5.0
FS_THREADS = 4  # detection's own worker threads for filesystem calls (a hung share cannot take more)
FS_CALL_TIMEOUT = 30.0  # a folder check that takes longer counts as "unavailable" (the thread is left to finish)
T = TypeVar("T")


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class ReadySink(Protocol):
    """Where settled files go (the daemon records them in the store)."""

    def known(self, path: str, sig: Signature) -> bool:
        """True when this exact version was already recorded (no need to wait for it to settle)."""
        ...

    def ready(self, folder: FolderConfig, path: str, rel_path: str, sig: Signature) -> None:
        """A file version that stayed unchanged for its folder's settle window."""
        ...


@dataclass
class FolderState:
    """Detection's view of one watched folder, for logs and `watcher status`."""

    config: FolderConfig
    filter: PathFilter
    watch: FolderWatch | None = None
    available: bool = True
    polling_decision: tuple[bool, str] = (False, "native events")
    next_rescan: float = 0.0
    device: int | None = None  # st_dev of the folder when its watch started: a change means a (un)mount


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
    ) -> None:
        self.sink = sink
        self.health_every = health_every
        self._clock = clock
        self._decide = decide_polling or (lambda f: decide_polling_for(str(f.path), f.poll))
        self.folders: dict[str, FolderState] = {}
        for f in folders:
            root = str(f.path)
            extra = (excluded_dirs or {}).get(root, ())
            self.folders[root] = FolderState(f, PathFilter(f.include, f.exclude, extra))
        self._lock = threading.Lock()  # held by the one settle check at a time, never by the event loop
        # hints wait here until the next check takes them into the settler: the loop never waits for a check
        # that is stat-ing files on a slow share
        self._hints: collections.deque[tuple[str, float, bool, str]] = collections.deque()
        self.settler = Settler(clock, known=sink.known)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._pending_dirs: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._failed: dict[str, str] = {}  # path -> the last failure logged for it (each is logged once)

    # -- off-loop filesystem calls --------------------------------------------------------------------------

    async def _fs(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run a blocking filesystem call in detection's bounded pool (raises TimeoutError after ``timeout``)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(FS_THREADS, thread_name_prefix="watcher-detect")
        future = asyncio.get_running_loop().run_in_executor(self._pool, fn)
        if timeout is None:
            return await future
        return await asyncio.wait_for(future, timeout)

    async def _device(self, path: str) -> int | None:
        """The folder's st_dev, or None when it is not a folder or does not answer in time (off the loop)."""

        def device() -> int | None:
            try:
                st = os.stat(path)
            except OSError:
                return None
            return st.st_dev if stat.S_ISDIR(st.st_mode) else None

        try:
            return await self._fs(device, FS_CALL_TIMEOUT)
        except TimeoutError:
            log.warning(
                "folder.slow",
                folder=display(path),
                reason=f"checking the folder took longer than {FS_CALL_TIMEOUT:.0f} s",
                next="treating it as unavailable for now",
            )
            return None

    async def _isdir(self, path: str) -> bool:
        """``os.path.isdir`` off the loop; a folder that does not answer in time counts as not there."""
        try:
            return await self._fs(lambda: os.path.isdir(path), FS_CALL_TIMEOUT)
        except TimeoutError:
            log.warning(
                "folder.slow",
                folder=path,
                reason=f"checking the folder took longer than {FS_CALL_TIMEOUT:.0f} s",
                next="treating it as unavailable for now",
            )
            return False

    def _report_failure(self, event: str, path: str, error: str, next_step: str) -> None:
        """Log a failure about one path once (until it changes or the path works again)."""
        if self._failed.get(path) == error:
            log.debug(event, path=display(path), error=error, next=next_step)
            return
        self._failed[path] = error
        log.error(event, path=display(path), error=error, next=next_step)

    # -- the one entry point -----------------------------------------------------------------------------

    def folder_of(self, path: str) -> FolderState | None:
        best = None
        for root, state in self.folders.items():
            if (path == root or path.startswith(root.rstrip(os.sep) + os.sep)) and (
                best is None or len(root) > len(best.config.path.as_posix())
            ):
                best = state
        return best

    def hint(self, path: str, *, is_dir: bool = False, closed: bool = False) -> None:
        """Something may have happened at ``path`` (event loop thread only). Never raises."""
        try:
            self._hint(path, is_dir=is_dir, closed=closed)
        except Exception as exc:
            self._report_failure("detect.hint_failed", path, _reason(exc), "ignored; the next scan looks again")

    def _hint(self, path: str, *, is_dir: bool, closed: bool) -> None:
        path = os.path.abspath(path)
        state = self.folder_of(path)
        if state is None:
            return
        root = str(state.config.path)
        rel = os.path.relpath(path, root)
        if is_dir:
            if rel == "." or (state.config.recursive and state.filter.wants_dir(rel)):
                self._pending_dirs.add(path)
                self._wake.set()
            return
        if rel.startswith("..") or (not state.config.recursive and os.sep in rel):
            return
        if not state.filter.wants_file(rel):
            return
        self._hints.append((path, state.config.settle_seconds, closed, root))
        self._wake.set()

    def hint_threadsafe(self, path: str, is_dir: bool, closed: bool) -> None:
        """The observers' way in: hop onto the event loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: self.hint(path, is_dir=is_dir, closed=closed))

    # -- scans ---------------------------------------------------------------------------------------------

    async def scan(self, root: str | None = None, start: str | None = None) -> int:
        """Hint every wanted file under a folder (or all folders); returns how many were hinted."""
        states = [self.folders[root]] if root else list(self.folders.values())
        count = 0
        for state in states:
            folder = str(state.config.path)
            if not await self._isdir(folder):
                continue
            try:
                paths = await self._fs(functools.partial(_walk_list, folder, state, start))
            except Exception as exc:
                log.error("scan.failed", folder=display(folder), error=_reason(exc), next="trying at the next scan")
                continue
            for p in paths:
                self.hint(p)
            count += len(paths)
            if start is None:
                log.info("scan.done", folder=display(folder), files=len(paths))
        return count

    # -- the loop -------------------------------------------------------------------------------------------

    def idle(self) -> bool:
        """True when nothing is waiting to settle and no folder scan is queued."""
        return not self.settler.candidates and not self._pending_dirs and not self._hints

    async def check_once(self) -> None:
        """Stat every candidate once and hand the settled ones to the sink."""
        while self._pending_dirs:
            directory = self._pending_dirs.pop()
            state = self.folder_of(directory)
            if state is not None:
                await self.scan(str(state.config.path), start=directory)

        def check() -> list[Verdict]:
            with self._lock:
                while self._hints:
                    path, settle, closed, root = self._hints.popleft()
                    self.settler.hint(path, settle, closed=closed, root=root)
                return self.settler.check()

        for verdict in await self._fs(check):
            path = verdict.candidate.path
            if verdict.outcome == "gone":
                log.info("detect.vanished", path=display(path), next="nothing to do: it was deleted before it settled")
            elif verdict.outcome == "skipped":
                self._report_failure("detect.skipped", path, verdict.error or "", "not processed")
            elif verdict.outcome == "failed":
                self._report_failure(
                    "detect.check_failed", path, verdict.error or "", "not processed; the next scan looks again"
                )
            elif verdict.outcome == "ready" and verdict.signature is not None:
                self._ready(path, verdict.signature)

    def _ready(self, path: str, sig: Signature) -> None:
        """Hand one settled file to the sink; a failure there is this file's alone."""
        try:
            state = self.folder_of(path)
            if state is None:
                return
            rel = os.path.relpath(path, state.config.path)
            self.sink.ready(state.config, path, rel, sig)
        except Exception as exc:
            self._report_failure("detect.record_failed", path, _reason(exc), "it will be seen again at the next scan")
        else:
            self._failed.pop(path, None)

    async def settle_all(self, timeout: float | None = None) -> None:
        """Check repeatedly until every candidate settled or vanished (for `watcher scan`)."""
        deadline = None if timeout is None else self._clock() + timeout
        while not self.idle():
            if deadline is not None and self._clock() > deadline:
                raise TimeoutError("files were still changing")
            await self.check_once()
            if not self.idle():
                await asyncio.sleep(TICK)

    async def run(self, stop: asyncio.Event, on_first_scan: Callable[[], None] | None = None) -> None:
        """Start the observers, scan everything once, then tick until ``stop`` is set."""
        self._loop = asyncio.get_running_loop()
        waker = asyncio.create_task(self._wake_on(stop))
        try:
            for root in self.folders:
                await self._ensure_watch(root)
            await self.scan()
            now = self._clock()
            for state in self.folders.values():
                state.next_rescan = now + state.config.rescan_interval * random.uniform(0.9, 1.1)
            if on_first_scan:
                on_first_scan()
            next_health = self._clock() + self.health_every
            while not stop.is_set():
                self._wake.clear()
                await self.check_once()
                now = self._clock()
                if now >= next_health:
                    await self._health()
                    next_health = self._clock() + self.health_every
                for root, state in self.folders.items():
                    if now >= state.next_rescan and state.available:
                        state.next_rescan = now + state.config.rescan_interval * random.uniform(0.9, 1.1)
                        await self.scan(root)
                if stop.is_set():
                    break
                if not self.idle():
                    await _wait(stop, TICK)  # candidates are checked at a steady pace, events or not
                else:
                    await _wait(self._wake, self.health_every)
        finally:
            waker.cancel()
            for state in self.folders.values():
                if state.watch is not None:
                    await self._fs(state.watch.stop)
                    state.watch = None
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _ensure_watch(self, root: str) -> None:
        """Start watching ``root`` (off the loop: a polling observer's first snapshot walks the whole folder)."""
        state = self.folders[root]
        state.device = await self._device(root)
        if state.device is None:
            if state.available:
                log.error(
                    "folder.unavailable", folder=display(root), next="waiting for it to come back; nothing is lost"
                )
            state.available = False
            return
        if not state.available:
            log.info("folder.available", folder=display(root), next="watching and scanning it again")
            state.available = True
            self._pending_dirs.add(root)
        try:
            polling, reason = await self._fs(lambda: self._decide(state.config))
            state.watch = await self._fs(
                lambda: start_watch(
                    root,
                    recursive=state.config.recursive,
                    polling=polling,
                    poll_interval=state.config.poll_interval,
                    hint=self.hint_threadsafe,
                    reason=reason,
                )
            )
        except Exception as exc:
            log.error(
                "watch.start_failed",
                folder=display(root),
                error=_reason(exc),
                next=f"rescans still find new files; trying again in {self.health_every:g} s",
            )
            return
        log.info(
            "folder.watching",
            folder=display(root),
            mode="polling" if state.watch.polling else "native",
            reason=state.watch.reason,
            filter=repr(state.filter),
        )

    async def _health(self) -> None:
        """Restart dead observers (falling back to polling) and notice folders that vanished or returned."""
        for root, state in self.folders.items():
            device = await self._device(root)
            if device is not None and state.device is not None and device != state.device:
                log.error(
                    "folder.remounted",
                    folder=display(root),
                    reason="the filesystem under the folder changed: a share was unmounted, or mounted over it",
                    next="watching it again and rescanning; files of a share that went away wait for it to return",
                )
                if state.watch is not None:
                    old, state.watch = state.watch, None
                    await self._fs(old.stop)
                self._pending_dirs.add(root)
            if device is None:
                if state.available:
                    log.error(
                        "folder.unavailable", folder=display(root), next="paused until it comes back; nothing is lost"
                    )
                    state.available = False
                if state.watch is not None:
                    watch, state.watch = state.watch, None
                    await self._fs(watch.stop)
                continue
            if state.watch is None:
                await self._ensure_watch(root)
                continue
            if not state.watch.alive():
                log.error(
                    "watch.died", folder=display(root), next="restarting it with polling and rescanning the folder"
                )
                dead, state.watch = state.watch, None
                await self._fs(dead.stop)
                state.config = state.config.model_copy(update={"poll": True})
                try:
                    state.watch = await self._fs(
                        functools.partial(
                            start_watch,
                            root,
                            recursive=state.config.recursive,
                            polling=True,
                            poll_interval=state.config.poll_interval,
                            hint=self.hint_threadsafe,
                            reason="the native observer died; polling instead",
                        )
                    )
                except Exception as exc:
                    log.error("watch.start_failed", folder=display(root), error=_reason(exc), next="trying again later")
                self._pending_dirs.add(root)

    def describe(self) -> list[dict[str, object]]:
        """Per-folder watch mode and availability, for status and logs."""
        return [
            {
                "folder": root,
                "available": s.available,
                "mode": None if s.watch is None else ("polling" if s.watch.polling else "native"),
                "reason": None if s.watch is None else s.watch.reason,
            }
            for root, s in self.folders.items()
        ]


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


def decide_polling_for(path: str, poll: bool | str) -> tuple[bool, str]:
    """Whether a folder is polled: as configured, or by its filesystem type when ``poll = "auto"``."""
    if poll == "auto":
        return decide_polling_for_type("auto", filesystem_type(path))
    return decide_polling_for_type(bool(poll), None)


def _walk_list(folder: str, state: FolderState, start: str | None) -> list[str]:
    """In a worker thread: every wanted file under ``start`` (or the folder)."""
    return list(walk(folder, state.filter, recursive=state.config.recursive, start=start))
