"""Readiness: a hinted file becomes work once its size, mtime and inode stayed unchanged for the settle window."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from watcher.audiofile import Signature

# After a close-after-write event (Linux, local disks) the file must still be quiet this long.
CLOSED_SETTLE_SECONDS = 1.0


@dataclass
class Candidate:
    """A file seen but not yet settled."""

    path: str
    settle: float
    signature: Signature | None = None
    stable_since: float = 0.0
    closed: bool = False


@dataclass(frozen=True)
class Verdict:
    """What one check of a candidate decided: ``ready``, ``waiting``, ``gone`` or ``known``."""

    outcome: str
    candidate: Candidate
    signature: Signature | None = None


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

    def hint(self, path: str, settle: float, *, closed: bool = False) -> None:
        """Note activity on a path; a non-close hint restarts the quiet period."""
        cand = self.candidates.get(path)
        if cand is None:
            self.candidates[path] = Candidate(path, settle, closed=closed)
            return
        if closed:
            cand.closed = True
        else:
            cand.closed = False
            cand.stable_since = self._clock()

    def forget(self, path: str) -> Candidate | None:
        return self.candidates.pop(path, None)

    def check(self) -> list[Verdict]:
        """Stat every candidate once; ready and gone ones leave the candidate list."""
        verdicts = []
        for path, cand in list(self.candidates.items()):
            now = self._clock()
            try:
                sig = Signature.of(self._stat(path))
            except FileNotFoundError:
                del self.candidates[path]
                verdicts.append(Verdict("gone", cand))
                continue
            except OSError:
                continue  # transient (share hiccup): look again at the next check
            if sig != cand.signature:
                first = cand.signature is None
                cand.signature = sig
                cand.stable_since = now
                if first and self._known(path, sig):
                    del self.candidates[path]
                    verdicts.append(Verdict("known", cand, sig))
                    continue
                verdicts.append(Verdict("waiting", cand, sig))
                continue
            needed = min(cand.settle, CLOSED_SETTLE_SECONDS) if cand.closed else cand.settle
            if now - cand.stable_since >= needed:
                del self.candidates[path]
                verdicts.append(Verdict("ready", cand, sig))
            else:
                verdicts.append(Verdict("waiting", cand, sig))
        return verdicts

    def next_deadline(self) -> float | None:
        """The earliest time a candidate could become ready (None when there is none)."""
        times = [
            c.stable_since + (min(c.settle, CLOSED_SETTLE_SECONDS) if c.closed else c.settle)
            for c in self.candidates.values()
            if c.signature is not None
        ]
        return min(times) if times else None
