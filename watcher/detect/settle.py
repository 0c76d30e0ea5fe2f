"""Readiness: a hinted file becomes work once its size, mtime and inode stayed unchanged for the settle window."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from watcher.audiofile import Signature

# After a close-after-write event (Linux, local disks) the file must still be quiet this long.
CLOSED_SETTLE_SECONDS = 1.0
# stat errors that looking again cannot fix: the path itself is unusable (too long, a link loop, ...).
FINAL_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EINVAL})


@dataclass
class Candidate:
    """A file seen but not yet settled."""

    path: str
    settle: float
    signature: Signature | None = None
    stable_since: float = 0.0
    closed: bool = False
    root: str | None = None  # the watched folder: a symbolic link must not lead out of it


@dataclass(frozen=True)
class Verdict:
    """What one check of a candidate decided: ``ready``, ``waiting``, ``gone``, ``known``, ``skipped`` or ``failed``.

    ``skipped`` (not a regular file) and ``failed`` (an error looking at it) carry the reason in ``error``;
    both leave the candidate list, and a later scan or event brings the path back.
    """

    outcome: str
    candidate: Candidate
    signature: Signature | None = None
    error: str | None = None


def link_stays_inside(path: str, root: str) -> bool:
    """True when ``path`` (a symbolic link) resolves to something inside the folder ``root``."""
    target = os.path.realpath(path)
    real_root = os.path.realpath(root)
    return target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)


class Settler:
    """Tracks candidates and decides, at each check, which ones are ready, gone or still changing."""

    def __init__(
        self,
        clock: Callable[[], float],
        stat: Callable[[str], os.stat_result] = os.stat,
        known: Callable[[str, Signature], bool] = lambda path, sig: False,
    ) -> None:
        self._clock = clock
        self._stat = stat
        self._known = known
        self.candidates: dict[str, Candidate] = {}

    def hint(self, path: str, settle: float, *, closed: bool = False, root: str | None = None) -> None:
        """Note activity on a path; a non-close hint restarts the quiet period."""
        cand = self.candidates.get(path)
        if cand is None:
            self.candidates[path] = Candidate(path, settle, closed=closed, root=root)
            return
        if closed:
            cand.closed = True
        else:
            cand.closed = False
            cand.stable_since = self._clock()

    def forget(self, path: str) -> Candidate | None:
        return self.candidates.pop(path, None)

    def check(self) -> list[Verdict]:
        """Stat every candidate once; ready, gone, skipped and failed ones leave the candidate list.

        Never raises: whatever goes wrong with one path (its stat, the ``known`` callback) is that path's
        ``failed`` verdict, and the other candidates are still checked.
        """
        verdicts = []
        for path, cand in list(self.candidates.items()):
            try:
                verdict = self._check_one(path, cand)
            except Exception as exc:
                verdict = Verdict("failed", cand, error=f"{type(exc).__name__}: {exc}")
            if verdict is None:
                continue
            if verdict.outcome in ("ready", "gone", "known", "skipped", "failed"):
                self.candidates.pop(path, None)
            verdicts.append(verdict)
        return verdicts

    def _check_one(self, path: str, cand: Candidate) -> Verdict | None:
        now = self._clock()
        try:
            st = self._stat(path)
        except FileNotFoundError:
            return Verdict("gone", cand)
        except OSError as exc:
            if exc.errno in FINAL_ERRNOS:
                return Verdict("failed", cand, error=exc.strerror or str(exc))
            return None  # transient (share hiccup): look again at the next check
        if not stat.S_ISREG(st.st_mode):
            return Verdict("skipped", cand, error="not a regular file (a FIFO, device, socket or folder)")
        if cand.root is not None and os.path.islink(path) and not link_stays_inside(path, cand.root):
            return Verdict("skipped", cand, error="a symbolic link to a file outside the watched folder")
        sig = Signature.of(st)
        if sig != cand.signature:
            first = cand.signature is None
            cand.signature = sig
            cand.stable_since = now
            if first and self._known(path, sig):
                return Verdict("known", cand, sig)
            return Verdict("waiting", cand, sig)
        needed = min(cand.settle, CLOSED_SETTLE_SECONDS) if cand.closed else cand.settle
        if now - cand.stable_since >= needed:
            return Verdict("ready", cand, sig)
        return Verdict("waiting", cand, sig)

    def next_deadline(self) -> float | None:
        """The earliest time a candidate could become ready (None when there is none)."""
        times = [
            c.stable_since + (min(c.settle, CLOSED_SETTLE_SECONDS) if c.closed else c.settle)
            for c in self.candidates.values()
            if c.signature is not None
        ]
        return min(times) if times else None
