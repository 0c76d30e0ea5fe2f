"""The state folder's lock: one daemon per store folder, and commands that work on the store only while no daemon
runs (the lock is the only proof)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from watcher.errors import StartupError

DAEMON = "the daemon"  # the role `watcher run` takes the lock in


class StateLock:
    """An exclusive lock on the state folder, so two daemons never work from one store."""

    def __init__(self, state_dir: Path, *, role: str = "a command") -> None:
        """``role``: who takes it, as the holder's line tells others ("watcher pid N (the daemon)")."""
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "watcher.lock"
        self.role = role
        self._fh: Any = None

    def acquire(self, *, wait: float = 0.0) -> None:
        """Take the lock, or raise StartupError naming its holder; ``wait``: seconds to keep trying first (a daemon
        starting while a short command, `watcher status` or `scan`, holds it for a moment waits for it)."""
        fh = open(self.path, "a+")  # noqa: SIM115 - held for the life of the process
        deadline = time.monotonic() + wait
        while not self._try(fh):
            if time.monotonic() < deadline:
                time.sleep(0.05)  # sleep-ok: flock has no timed wait; tried again until the deadline
                continue
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise StartupError(
                f"the state folder {self.path.parent} is in use by {holder}; stop that watcher first "
                "or give this one another state_dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"watcher pid {os.getpid()} ({self.role})\n")
        fh.flush()
        self._fh = fh

    @staticmethod
    def _try(fh: Any) -> bool:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    @staticmethod
    def holder(state_dir: Path) -> str | None:
        """Who holds the lock of ``state_dir`` ("watcher pid N (its role)"), or None when nobody does (checked by
        taking it for an instant, which is the only proof; creates nothing)."""
        try:
            fh = open(state_dir / "watcher.lock")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return None
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return fh.read().strip() or "another process"
            fcntl.flock(fh, fcntl.LOCK_UN)
            return None

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    @classmethod
    @contextlib.contextmanager
    def stopped(cls, state_dir: Path, nothing: str) -> Iterator[None]:
        """Held for a command that needs the daemon stopped (restore, migrate); refused while one runs, the
        message starting with ``nothing`` (what was not done)."""
        lock = cls(state_dir, role="a store command")
        try:
            lock.acquire()
        except StartupError as exc:
            raise StartupError(f"{nothing}: {exc}") from None
        try:
            yield
        finally:
            lock.release()
