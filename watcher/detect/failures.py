"""Failures about one path, each logged once: the detector's only per-path memory that outlives a check.

The last failure of at most ``limit`` paths is remembered (the one least recently reported is forgotten first,
and is logged again if it fails again); a path's entry goes when it works again or is gone, so a file deleted
after a failure leaves nothing behind, and a share full of failing files costs a bounded amount of memory.
"""

from __future__ import annotations

from collections import OrderedDict

import structlog

from watcher.names import display

log = structlog.get_logger("watcher.detect")
FAILURES_KEPT = 1000  # paths whose last failure is remembered (about 0.3 kB each)


class FailureLog:
    """Logs a failure about one path once (until it changes or the path works again); bounded."""

    def __init__(self, limit: int = FAILURES_KEPT) -> None:
        self.limit = limit
        self._last: OrderedDict[str, str] = OrderedDict()  # path -> the last failure logged, least recent first

    def __len__(self) -> int:
        return len(self._last)

    def report(self, event: str, path: str, error: str, next_step: str) -> None:
        """Log ``error`` about ``path`` at error level the first time, at debug level while it repeats."""
        if self._last.get(path) == error:
            self._last.move_to_end(path)
            log.debug(event, path=display(path), error=error, next=next_step)
            return
        self._last[path] = error
        self._last.move_to_end(path)
        while len(self._last) > self.limit:
            self._last.popitem(last=False)
        log.error(event, path=display(path), error=error, next=next_step)

    def forget(self, path: str) -> None:
        """``path`` works again, or is gone: a new failure there is news again."""
        self._last.pop(path, None)
