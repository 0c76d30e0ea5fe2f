"""watchdog observers, one per folder, turning filesystem events into hints; with a health check.

Events are only hints: a handler never raises (that would end watchdog's emitter thread) and never does
work itself. A dead observer is reported and restarted by the detector, falling back to polling.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

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
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

log = structlog.get_logger("watcher.detect")

# hint(path, is_dir, closed)
HintFn = Callable[[str, bool, bool], None]


class _HintHandler(FileSystemEventHandler):
    def __init__(self, hint: HintFn) -> None:
        self._hint = hint

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            path = event.src_path if isinstance(event.src_path, str) else event.src_path.decode()
            if isinstance(event, FileMovedEvent | DirMovedEvent):
                dest = event.dest_path if isinstance(event.dest_path, str) else event.dest_path.decode()
                self._hint(dest, isinstance(event, DirMovedEvent), False)
            elif isinstance(event, DirCreatedEvent):
                self._hint(path, True, False)
            elif isinstance(event, FileClosedEvent):
                self._hint(path, False, True)
            elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
                self._hint(path, False, False)
        except Exception:  # a raising handler would silently end the emitter thread
            log.exception("watch.handler_failed", path=getattr(event, "src_path", None))


@dataclass
class FolderWatch:
    """The observer running for one folder and how it watches (native or polling)."""

    observer: BaseObserver
    polling: bool
    reason: str

    def alive(self) -> bool:
        if not self.observer.is_alive():
            return False
        return all(e.is_alive() for e in self.observer.emitters)

    def stop(self) -> None:
        try:
            self.observer.stop()
            self.observer.join(timeout=5)
        except Exception:
            log.exception("watch.stop_failed")


def start_watch(
    path: str, *, recursive: bool, polling: bool, poll_interval: float, hint: HintFn, reason: str
) -> FolderWatch:
    """Start an observer on ``path``; a native one that cannot start (watch limit) falls back to polling."""
    if not polling:
        native: BaseObserver | None = None
        try:
            native = Observer()  # inotify: creating the observer already takes an instance
            native.schedule(_HintHandler(hint), path, recursive=recursive)
            native.start()
            return FolderWatch(native, False, reason)
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
    observer: BaseObserver = PollingObserver(timeout=poll_interval)
    observer.schedule(_HintHandler(hint), path, recursive=recursive)
    observer.start()
    return FolderWatch(observer, True, reason)
