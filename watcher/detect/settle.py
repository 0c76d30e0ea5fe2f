"""Readiness: a hinted file becomes work once its size, mtime and inode stayed unchanged for the settle window.

Each candidate has one deadline, kept in one timer heap: :meth:`Settler.check` looks only at the candidates
that are due and :meth:`Settler.next_deadline` says when to call it again, so nobody checks on a tick.

A close-after-write event (Linux, local disks) may end the wait at once. The rule: the close is trusted when
the file's stat at the close equals *the last stat*, a stat taken after the latest write hint (created,
modified, moved) the settler heard of. When no such stat exists (the close is the first thing seen, or it
arrived right behind write hints nobody has stat-ed since), the stat at the close becomes the last stat and
a second one follows :data:`CLOSE_CONFIRM_SECONDS` later: two equal stats after the writes, then ready. A
stat that differs from a last stat taken after the writes means the writer reopened the file (or another one
wrote) without a hint yet: the close is refused and the file waits its full settle window. A write hint after
the close cancels it the same way. The window is never shortened by anything else.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from watcher.audiofile import Signature
from watcher.errors import Deferred

# After a close whose stat had nothing to compare with, the second stat follows this much later.
CLOSE_CONFIRM_SECONDS = 0.05
# A stat that failed for a reason looking again may fix (a share's hiccup) is tried again this much later.
RETRY_SECONDS = 0.5
# stat errors that looking again cannot fix: the path itself is unusable (too long, a link loop, ...).
FINAL_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EINVAL})


@dataclass
class Candidate:
    """A file seen but not yet settled, and when it is looked at next (``due``)."""

    path: str
    settle: float
    signature: Signature | None = None  # the last stat
    stable_since: float = 0.0
    closed: bool = False  # a close-after-write event came, and no write hint since
    root: str | None = None  # the watched folder: a symbolic link must not lead out of it
    fresh: bool = False  # the last stat was taken after the latest write hint
    due: float = 0.0
    queued: float | None = None  # the time of this candidate's live entry in the timer heap
    live: bool = False  # hinted as it arrived (an event, a poll, `watcher scan PATH`), not found as backlog


class Readiness(StrEnum):
    """What one check of a hinted file found: it is ``ready`` (settled), still ``waiting``, ``gone`` (deleted),
    ``known`` (recorded as it is), ``skipped`` (not a regular file) or ``failed`` (an error looking at it)."""

    READY = "ready"
    WAITING = "waiting"
    GONE = "gone"
    KNOWN = "known"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class Finding:
    """What one check of a candidate decided: ``ready``, ``waiting``, ``gone``, ``known``, ``skipped`` or ``failed``.

    ``skipped`` (not a regular file) and ``failed`` (an error looking at it) carry the reason in ``error``;
    both leave the candidate list, and a later scan or event brings the path back.
    """

    readiness: Readiness
    candidate: Candidate
    signature: Signature | None = None
    error: str | None = None


def link_stays_inside(path: str, root: str) -> bool:
    """True when ``path`` (a symbolic link) resolves to something inside the folder ``root``."""
    target = os.path.realpath(path)
    real_root = os.path.realpath(root)
    return target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)


class Settler:
    """Tracks candidates, each with a deadline in one timer heap; a check looks at the due ones only.

    Not thread-safe: the detector calls it from one thread at a time (under its lock, in its pool).
    """

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
        self._heap: list[tuple[float, int, str]] = []  # (time, tie-breaker, path); stale entries are skipped
        self._order = itertools.count()

    def _schedule(self, cand: Candidate, at: float) -> None:
        """Look at ``cand`` at ``at``: an earlier time gets a new heap entry, a later one moves it lazily."""
        cand.due = at
        if cand.queued is None or at < cand.queued:
            cand.queued = at
            heapq.heappush(self._heap, (at, next(self._order), cand.path))

    def hint(
        self, path: str, settle: float, *, closed: bool = False, root: str | None = None, live: bool = False
    ) -> None:
        """Note activity on a path. A new path is stat-ed at once; a write hint restarts the quiet period; a
        close is looked at once (see the module docstring). A ``live`` hint makes the candidate live for good."""
        now = self._clock()
        cand = self.candidates.get(path)
        if cand is None:
            cand = self.candidates[path] = Candidate(path, settle, closed=closed, root=root, live=live)
            self._schedule(cand, now)
            return
        cand.live = cand.live or live
        if closed:
            cand.closed = True
            self._schedule(cand, now)
        else:
            cand.closed = False
            cand.fresh = False
            cand.stable_since = now
            if cand.signature is not None:  # a path not stat-ed yet stays due at once
                self._schedule(cand, now + cand.settle)

    def forget(self, path: str) -> Candidate | None:
        return self.candidates.pop(path, None)

    def _pop_due(self, now: float) -> list[Candidate]:
        """The candidates whose deadline has come, each once; entries moved later are queued again."""
        due: list[Candidate] = []
        while self._heap and self._heap[0][0] <= now:
            at, _, path = heapq.heappop(self._heap)
            cand = self.candidates.get(path)
            if cand is None or cand.queued != at:
                continue  # forgotten, or superseded by an earlier entry
            cand.queued = None
            if cand.due > now:
                self._schedule(cand, cand.due)
            else:
                due.append(cand)
        return due

    def next_deadline(self) -> float | None:
        """The earliest time a candidate is due (None when there is none)."""
        while self._heap:
            at, _, path = self._heap[0]
            cand = self.candidates.get(path)
            if cand is None or cand.queued != at:
                heapq.heappop(self._heap)
            elif cand.due > at:  # moved later by a write hint: queue it at its real deadline
                heapq.heappop(self._heap)
                cand.queued = None
                self._schedule(cand, cand.due)
            else:
                return at
        return None

    def check(self) -> list[Finding]:
        """Stat every due candidate once; ready, gone, known, skipped and failed ones leave the candidate list.

        A candidate that is not due is not looked at and gives no finding. Never raises: whatever goes wrong
        with one path (its stat, the ``known`` callback) is that path's ``failed`` finding, and the other
        candidates are still checked.
        """
        now = self._clock()
        findings = []
        for cand in self._pop_due(now):
            try:
                finding = self._check_one(cand, now)
            except Deferred:  # the store cannot answer ``known`` now (an outage): asked again, the file kept
                finding = None
            except Exception as exc:
                finding = Finding(Readiness.FAILED, cand, error=f"{type(exc).__name__}: {exc}")
            if finding is None:
                self._schedule(cand, now + RETRY_SECONDS)
                continue
            if finding.readiness == Readiness.WAITING:
                if cand.queued is None:
                    self._schedule(cand, cand.due)
            else:
                self.candidates.pop(cand.path, None)
            findings.append(finding)
        return findings

    def _check_one(self, cand: Candidate, now: float) -> Finding | None:
        """One look at a due candidate; a ``waiting`` finding has set the candidate's next ``due``."""
        path = cand.path
        try:
            st = self._stat(path)
        except FileNotFoundError:
            return Finding(Readiness.GONE, cand)
        except OSError as exc:
            if exc.errno in FINAL_ERRNOS:
                return Finding(Readiness.FAILED, cand, error=exc.strerror or str(exc))
            return None  # transient (share hiccup): look again a little later
        if not stat.S_ISREG(st.st_mode):
            return Finding(Readiness.SKIPPED, cand, error="not a regular file (a FIFO, device, socket or folder)")
        if cand.root is not None and os.path.islink(path) and not link_stays_inside(path, cand.root):
            return Finding(Readiness.SKIPPED, cand, error="a symbolic link to a file outside the watched folder")
        sig = Signature.of(st)
        last, after_writes = cand.signature, cand.fresh
        cand.signature, cand.fresh = sig, True
        if last is None:
            cand.stable_since = now
            if self._known(path, sig):
                return Finding(Readiness.KNOWN, cand, sig)
        elif sig != last:
            cand.stable_since = now
            if cand.closed and after_writes:
                cand.closed = False  # changed after the writes we heard of: the writer is back, do not trust
        elif cand.closed and after_writes:
            return Finding(Readiness.READY, cand, sig)  # the close, and the same stat as after the last write
        if cand.closed:
            cand.due = now + min(cand.settle, CLOSE_CONFIRM_SECONDS)  # a second stat to compare with
        else:
            cand.due = cand.stable_since + cand.settle
            if now >= cand.due and last is not None:  # never on a single stat, even with a zero window
                return Finding(Readiness.READY, cand, sig)
        return Finding(Readiness.WAITING, cand, sig)
