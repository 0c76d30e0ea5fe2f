"""watchdog observers, one per folder, turning filesystem events into hints; with a health check. A folder
that is polled (a share) gets our own :class:`~watcher.detect.poll.DirPoller` instead of an observer.

Events are only hints: a handler never raises (that would end watchdog's emitter thread) and never does
work itself. A dead observer is reported and restarted by the detector, falling back to polling.

When the kernel's inotify queue overflows, events were lost: watchdog (7.x) tells each watch group through
``InotifyWatchGroup.on_queue_overflow`` (on its reader thread) and rebuilds recursive watches, but passes
nothing on to handlers. :class:`OverflowAwareObserver` turns that call into a :class:`QueueOverflowEvent`
on the observer's own queue, and the handler answers it with a hint to rescan the whole folder.
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass, field

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver

from watcher.detect.poll import DirPoller, HintFn
from watcher.names import display

log = structlog.get_logger("watcher.detect")
__all__ = ["FolderWatch", "HintFn", "start_watch"]


@dataclass
class QueueOverflowEvent(FileSystemEvent):
    """The kernel dropped events for the watch on ``src_path`` (IN_Q_OVERFLOW): rescan it."""

    event_type: str = field(default="overflow", init=False)
    is_directory: bool = field(default=True, init=False)
    is_synthetic: bool = field(default=True)


def _overflow_aware_emitter() -> type | None:
    """An inotify emitter that queues a :class:`QueueOverflowEvent` when its watch group hears of an overflow."""
    if not sys.platform.startswith("linux"):
        return None
    from watchdog.observers.inotify import InotifyEmitter

    class OverflowAwareEmitter(InotifyEmitter):
        def on_thread_start(self) -> None:
            super().on_thread_start()
            group = self._inotify
            rebuild = getattr(group, "on_queue_overflow", None)  # watchdog 7: the overflow callback
            if group is None or rebuild is None:
                return  # an older watchdog: lost events are found by the periodic rescan

            def overflowed() -> None:
                try:
                    rebuild()  # watchdog's own repair: re-adding recursive watches
                finally:
                    self.queue_event(QueueOverflowEvent(self.watch.path))

            group.on_queue_overflow = overflowed  # type: ignore[method-assign]

    return OverflowAwareEmitter


_EMITTER = _overflow_aware_emitter()

# The events the handler acts on, and all an observer is asked for: watchdog derives the inotify mask from them,
# so opening and reading (IN_OPEN, IN_CLOSE_NOWRITE: every folder a scan lists, every file a job reads) and
# deletions no longer wake the observer's threads for an event the handler would drop.
HINTED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    QueueOverflowEvent,
]


def native_observer() -> BaseObserver:
    """The platform's native observer; on Linux one that reports inotify queue overflows to its handlers."""
    if _EMITTER is None:
        return Observer()
    from watchdog.observers.inotify import InotifyObserver

    observer = InotifyObserver(timeout=DEFAULT_OBSERVER_TIMEOUT)
    observer._emitter_class = _EMITTER  # the emitter class every schedule() creates
    return observer


def _text(path: bytes | str) -> str:
    """An event's path as watcher carries paths: ``str``, undecodable bytes as surrogate escapes."""
    return os.fsdecode(path)


class _HintHandler(FileSystemEventHandler):
    def __init__(self, hint: HintFn) -> None:
        self._hint = hint

    def dispatch(self, event: FileSystemEvent) -> None:
        """Every event goes to :meth:`on_any_event` only (our own overflow event has no ``on_*`` method)."""
        self.on_any_event(event)

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            path = _text(event.src_path)
            if isinstance(event, QueueOverflowEvent):
                log.warning(
                    "watch.overflow",
                    folder=path,
                    reason="the kernel's inotify queue overflowed and events were lost",
                    next="rescanning the folder now",
                )
                self._hint(path, is_dir=True, closed=False)
            elif isinstance(event, FileMovedEvent | DirMovedEvent):
                self._hint(_text(event.dest_path), is_dir=isinstance(event, DirMovedEvent), closed=False)
            elif isinstance(event, DirCreatedEvent):
                self._hint(path, is_dir=True, closed=False)
            elif isinstance(event, FileClosedEvent):
                self._hint(path, is_dir=False, closed=True)
            elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
                self._hint(path, is_dir=False, closed=False)
        except Exception as exc:  # a raising handler would silently end the emitter thread
            log.error(
                "watch.handler_failed",
                path=display(_text(getattr(event, "src_path", ""))),
                error=f"{type(exc).__name__}: {exc}",
                next="event ignored; the next scan finds the file",
            )


@dataclass
class FolderWatch:
    """The observer (or poller) running for one folder and how it watches (native or polling)."""

    observer: BaseObserver | DirPoller
    polling: bool
    reason: str

    def alive(self) -> bool:
        if not self.observer.is_alive():
            return False
        return not isinstance(self.observer, BaseObserver) or all(e.is_alive() for e in self.observer.emitters)

    def stop(self) -> None:
        try:
            self.observer.stop()
            self.observer.join(timeout=5)
        except Exception:
            log.exception("watch.stop_failed")


def start_watch(
    path: str,
    *,
    recursive: bool,
    polling: bool,
    poll_interval: float,
    hint: HintFn,
    reason: str,
    rescan_interval: float = 3600.0,
    seeded: bool = False,
) -> FolderWatch:
    """Start an observer on ``path``; a native one that cannot start (watch limit) falls back to polling, which
    lists every directory at start and again in full every ``rescan_interval``. ``seeded``: a poller waits for
    its first snapshot from the start-up scan's walk (:meth:`DirPoller.seed`)."""
    if not polling:
        native: BaseObserver | None = None
        try:
            native = native_observer()  # inotify: creating the observer already takes an instance
            native.schedule(_HintHandler(hint), path, recursive=recursive, event_filter=HINTED_EVENTS)
            native.start()
            return FolderWatch(native, polling=False, reason=reason)
        except OSError as exc:
            if native is not None:
                try:
                    native.stop()
                except Exception:
                    log.debug("watch.stop_after_failure_failed", path=path)
            if exc.errno == errno.ENOSPC:
                why = "the inotify watch limit is exhausted (raise fs.inotify.max_user_watches)"
            elif exc.errno == errno.EMFILE:
                why = "no inotify instance is left (raise fs.inotify.max_user_instances, or the open-files limit)"
            else:
                why = f"native watching failed: {exc.strerror or exc}"
            log.error("watch.native_failed", path=path, error=why, next="polling this folder instead")
            reason = why + "; polling instead"
    poller = DirPoller(
        path, recursive=recursive, hint=hint, interval=poll_interval, rescan_interval=rescan_interval, seeded=seeded
    )
    poller.start()
    return FolderWatch(poller, polling=True, reason=reason)
