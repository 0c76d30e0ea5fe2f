"""The watched folders: each one's observer, availability and health (a dead observer is restarted on polling,
a folder that vanished, came back or was mounted over is noticed), and detection's bounded pool of threads
for filesystem calls, so that a share that answers slowly slows detection, never the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import structlog

from watcher.config import AUDIO_PATTERNS, FolderConfig
from watcher.detect.filters import PathFilter
from watcher.detect.fstype import decide_polling as decide_polling_for_type
from watcher.detect.fstype import filesystem_type
from watcher.detect.poll import DirPoller
from watcher.detect.scan import Recorded, Sweep, changed_files
from watcher.detect.watch import FolderWatch, HintFn, start_watch
from watcher.names import display

log = structlog.get_logger("watcher.detect")
FS_THREADS = 4  # detection's own worker threads for filesystem calls (a hung share cannot take more)
FS_CALL_TIMEOUT = 30.0  # a folder check that takes longer counts as "unavailable" (the thread is left to finish)
T = TypeVar("T")


def reason_of(exc: BaseException) -> str:
    """An exception as the one-line reason a log shows."""
    return f"{type(exc).__name__}: {exc}"


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
    seen: bool = True  # the folder was there once (False: never seen, so it is missing rather than unavailable)
    walked: bool = False  # its first whole walk since the daemon started is done (leftovers swept, snapshot taken)


class FsPool:
    """Detection's bounded pool of threads for filesystem calls."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None

    async def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run a blocking filesystem call in detection's bounded pool (raises TimeoutError after ``timeout``)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(FS_THREADS, thread_name_prefix="watcher-detect")
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn)
        if timeout is None:
            return await future
        return await asyncio.wait_for(future, timeout)

    async def device(self, path: str) -> int | None:
        """The folder's st_dev, or None when it is not a folder or does not answer in time (off the loop)."""

        def device() -> int | None:
            try:
                st = os.stat(path)
            except OSError:
                return None
            return st.st_dev if stat.S_ISDIR(st.st_mode) else None

        try:
            return await self.call(device, FS_CALL_TIMEOUT)
        except TimeoutError:
            log.warning(
                "folder.slow",
                folder=display(path),
                reason=f"checking the folder took longer than {FS_CALL_TIMEOUT:.0f} s",
                next="treating it as unavailable for now",
            )
            return None

    async def isdir(self, path: str) -> bool:
        """``os.path.isdir`` off the loop; a folder that does not answer in time counts as not there."""
        try:
            return await self.call(functools.partial(os.path.isdir, path), FS_CALL_TIMEOUT)
        except TimeoutError:
            log.warning(
                "folder.slow",
                folder=path,
                reason=f"checking the folder took longer than {FS_CALL_TIMEOUT:.0f} s",
                next="treating it as unavailable for now",
            )
            return False

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class Watches:
    """The observers of the watched folders, started, checked and restarted off the event loop."""

    def __init__(
        self,
        folders: dict[str, FolderState],
        pool: FsPool,
        *,
        hint: HintFn,
        rescan: Callable[[str], None],
        decide: Callable[[FolderConfig], tuple[bool, str]],
        health_every: float,
    ) -> None:
        self.folders = folders
        self.pool = pool
        self.hint = hint
        self.rescan = rescan
        self.decide = decide
        self.health_every = health_every

    async def ensure(self, root: str, *, seeded: bool = False) -> None:
        """Start watching ``root`` (off the loop: a native observer adds a watch per directory of the folder).
        ``seeded``: a poller waits for its first snapshot from the start-up scan (see :meth:`release_pollers`)."""
        state = self.folders[root]
        state.device = await self.pool.device(root)
        if state.device is None:
            if state.available and not state.seen:
                log.error(
                    "folder.missing",
                    folder=display(root),
                    reason="it does not exist and never did for this store",
                    next="check its path in [[folders]] (a typo?); watching for it to appear",
                )
            elif state.available:
                log.error(
                    "folder.unavailable", folder=display(root), next="waiting for it to come back; nothing is lost"
                )
            state.available = False
            return
        state.seen = True
        if not state.available:
            log.info("folder.available", folder=display(root), next="watching and scanning it again")
            state.available = True
            self.rescan(root)
        try:
            polling, reason = await self.pool.call(functools.partial(self.decide, state.config))
            state.watch = await self._start(root, state, polling=polling, reason=reason, seeded=seeded)
        except Exception as exc:
            log.error(
                "watch.start_failed",
                folder=display(root),
                error=reason_of(exc),
                next=f"rescans still find new files; trying again in {self.health_every:g} s",
            )
            return
        log.info(
            "folder.watching",
            folder=display(root),
            mode="polling" if state.watch.polling else "native",
            reason=state.watch.reason,
            **_filter_shown(state),
        )

    async def health(self) -> None:
        """Restart dead observers (falling back to polling) and notice folders that vanished or returned."""
        for root, state in self.folders.items():
            device = await self.pool.device(root)
            if device is not None and state.device is not None and device != state.device:
                log.error(
                    "folder.remounted",
                    folder=display(root),
                    reason="the filesystem under the folder changed: a share was unmounted, or mounted over it",
                    next="watching it again and rescanning; files of a share that went away wait for it to return",
                )
                if state.watch is not None:
                    old, state.watch = state.watch, None
                    await self.pool.call(old.stop)
                self.rescan(root)
            if device is None:
                if state.available:
                    log.error(
                        "folder.unavailable", folder=display(root), next="paused until it comes back; nothing is lost"
                    )
                    state.available = False
                    state.seen = True
                if state.watch is not None:
                    watch, state.watch = state.watch, None
                    await self.pool.call(watch.stop)
                continue
            if state.watch is None:
                await self.ensure(root)
                continue
            if not state.watch.alive():
                log.error(
                    "watch.died", folder=display(root), next="restarting it with polling and rescanning the folder"
                )
                dead, state.watch = state.watch, None
                await self.pool.call(dead.stop)
                state.config = state.config.model_copy(update={"poll": True})
                try:
                    state.watch = await self._start(
                        root, state, polling=True, reason="the native observer died; polling instead"
                    )
                except Exception as exc:
                    log.error(
                        "watch.start_failed", folder=display(root), error=reason_of(exc), next="trying again later"
                    )
                self.rescan(root)

    def describe(self) -> list[dict[str, object]]:
        """Per-folder watch mode and availability, for status and logs."""
        return [
            {
                "folder": root,
                "available": s.available,
                "missing": not s.available and not s.seen,
                "mode": None if s.watch is None else ("polling" if s.watch.polling else "native"),
                "reason": None if s.watch is None else s.watch.reason,
            }
            for root, s in self.folders.items()
        ]

    def release_pollers(self) -> None:
        """After the start-up scan: a poller still waiting for the snapshot its walk would have taken (the walk
        failed, or never came) takes its own."""
        for state in self.folders.values():
            if state.watch is not None and isinstance(state.watch.observer, DirPoller):
                state.watch.observer.seed(None)

    async def _start(
        self, root: str, state: FolderState, *, polling: bool, reason: str, seeded: bool = False
    ) -> FolderWatch:
        """Start an observer (or poller) on ``root`` off the loop (a native one adds a watch per directory)."""
        start = functools.partial(
            start_watch,
            root,
            recursive=state.config.recursive,
            polling=polling,
            poll_interval=state.config.poll_interval,
            rescan_interval=state.config.rescan_interval,
            hint=self.hint,
            reason=reason,
            seeded=seeded,
        )
        return await self.pool.call(start)

    async def stop_all(self) -> None:
        for state in self.folders.values():
            if state.watch is not None:
                watch, state.watch = state.watch, None
                await self.pool.call(watch.stop)


def decide_polling_for(path: str, poll: bool | str) -> tuple[bool, str]:
    """Whether a folder is polled: as configured, or by its filesystem type when ``poll = "auto"``."""
    if poll == "auto":
        return decide_polling_for_type("auto", filesystem_type(path))
    return decide_polling_for_type(bool(poll), None)


def _filter_shown(state: FolderState) -> dict[str, str]:
    """The folder's filter for its start-up line, only when it is not the default (audio files, nothing excluded)."""
    if tuple(state.config.include) == AUDIO_PATTERNS and not state.config.exclude:
        return {}
    return {"filter": repr(state.filter)}


def walk_changed(
    state: FolderState,
    start: str | None,
    recorded: Recorded,
    poller: DirPoller | None = None,
    sweep: Sweep | None = None,
    *,
    first: bool = False,
) -> tuple[list[str], int]:
    """In a worker thread: the wanted files under ``start`` (or the folder) not recorded as they are, and how many
    files there were (:func:`~watcher.detect.scan.changed_files`). A ``poller`` still waiting for its first
    snapshot gets it from this walk (or, when the walk fails, is told to take its own); ``sweep`` is shown the
    temp files listed. ``first``: the folder's first whole walk (the start-up scan's), after which the folder
    counts as walked, and what it made (the snapshot) is kept out of the collector's passes."""
    listing = None if poller is None else poller.listing()
    try:
        with collector_paused(keep=first):
            found = changed_files(
                str(state.config.path),
                state.filter,
                recorded,
                recursive=state.config.recursive,
                start=start,
                listing=listing,
                sweep=sweep,
            )
    except BaseException:
        if poller is not None:
            poller.seed(None)
        raise
    if poller is not None and listing is not None:
        poller.seed(listing)
    if first:
        state.walked = True
    return found


class _CollectorPause:
    """The cyclic garbage collector off while walks run (back on after the last, if it was on before): a walk of
    100,000 files makes a tuple per file for the snapshot, and the collector's passes over them as they pile up
    cost about a tenth of the walk. Nothing a walk makes is cyclic; reference counting frees as usual meanwhile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._walks = 0
        self._resume = False

    @contextlib.contextmanager
    def __call__(self, *, keep: bool = False) -> Iterator[None]:
        """``keep``: what this walk made lives on (a poller's first snapshot), so it is moved out of the collector's
        passes (``gc.freeze``) before the collector comes back: its first passes would otherwise visit every
        tuple of it, and again each time it is promoted."""
        with self._lock:
            self._walks += 1
            if self._walks == 1:
                self._resume = gc.isenabled()
                gc.disable()
        try:
            yield
        finally:
            with self._lock:
                self._walks -= 1
                if keep:
                    gc.freeze()
                if self._walks == 0 and self._resume:
                    gc.enable()


collector_paused = _CollectorPause()


def absolute_path(path: str) -> str:
    """``os.path.abspath(path)``, without its work for a path that is absolute and normal already (an observer's):
    no ``.`` or ``..`` part, no doubled or trailing separator."""
    sep = os.sep
    if path[:1] == sep and f"{sep}." not in path and sep + sep not in path and not path.endswith(sep):
        return path
    return os.path.abspath(path)


def inside(path: str, root: str) -> str:
    """``os.path.relpath(path, root)`` for a normal ``path`` that :meth:`Detector.folder_of` placed under ``root``
    (so it is ``root`` or starts with it and a separator): a slice, not two more normalisations."""
    if path == root:
        return "."
    prefix = root.rstrip(os.sep) + os.sep
    if path.startswith(prefix) and root == absolute_path(root):
        return path[len(prefix) :]
    return os.path.relpath(path, root)
