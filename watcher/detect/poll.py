"""Polling a folder by its directories' mtimes: what watches a share where changes send no events (NFS, SMB).

Creating, renaming or deleting an entry changes its directory's mtime, so each poll stats only the directories
and lists again only those whose mtime (or inode) changed, plus those whose mtime was within
:data:`RECENT_SECONDS` of their last listing: with coarse mtimes (2 s on FAT and some SMB servers) a change
just after that listing can leave the mtime as it was, so such a directory is listed again until its mtime is
older than the listing by a safe margin. An in-place rewrite of an existing file keeps its directory's
mtime: a full listing every ``rescan_interval`` catches it. New and changed files are hinted like an observer's
events; a new directory is hinted as one (the detector scans it); a removed entry is forgotten and not hinted
(the observers do not hint deletions either: the settler notices a candidate that vanished).
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import structlog

log = structlog.get_logger("watcher.detect")
RECENT_SECONDS = 2.0  # the coarsest mtime granularity we allow for (FAT, some SMB servers)


class HintFn(Protocol):
    """How observers and pollers tell the detector that something may have happened at ``path`` (``is_dir``: a
    folder, to scan; ``closed``: a file closed after writing)."""

    def __call__(self, path: str, *, is_dir: bool, closed: bool) -> None: ...

# (is a directory, size, mtime_ns, inode) of one entry, from lstat
Entry = tuple[bool, int, int, int]
ScanDir = Callable[[str], AbstractContextManager[Iterator[os.DirEntry[str]]]]


@contextlib.contextmanager
def scandir_at(path: str) -> Iterator[Iterator[os.DirEntry[str]]]:
    """``os.scandir(path)`` through a descriptor of the directory: each entry's ``stat`` then resolves its own
    name only, not the whole path again (as ``find`` does), which halves a listing's cost on a deep tree."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with os.scandir(fd) as it:
            yield it
    finally:
        os.close(fd)


@dataclass
class _Dir:
    """One listed directory: its own mtime and inode when listed, when that was (our clock), its entries."""

    mtime_ns: int
    inode: int
    listed_at: float
    entries: dict[str, Entry] = field(default_factory=dict)


class Listing:
    """A poller's first snapshot as another walk takes it (the start-up scan's, so a polled tree is walked once).

    The walk reads each directory as :meth:`DirPoller._list_tree` does: ``clock()`` before listing it, every
    entry's ``lstat`` (a link as a link; sub-directories only when recursive), the directory's own stat after the
    listing. A directory whose listing failed is left out, as the poller leaves it out.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.dirs: dict[str, _Dir] = {}

    def add(self, path: str, listed_at: float, st: os.stat_result, entries: dict[str, Entry]) -> None:
        """One directory as listed: ``st`` is its stat taken after the listing, ``listed_at`` before it."""
        self.dirs[path] = _Dir(st.st_mtime_ns, st.st_ino, listed_at, entries)


class DirPoller:
    """Polls one folder every ``interval`` seconds in its own thread, hinting what changed (see the module)."""

    def __init__(
        self,
        root: str,
        *,
        recursive: bool,
        hint: HintFn,
        interval: float,
        rescan_interval: float,
        scandir: ScanDir = scandir_at,
        clock: Callable[[], float] = time.time,
        seeded: bool = False,
    ) -> None:
        """``seeded``: the thread waits for :meth:`seed` (another walk's :class:`Listing`, or None to take its own
        first snapshot) before it polls."""
        self.root = root
        self.recursive = recursive
        self.hint = hint
        self.interval = interval
        self.rescan_interval = rescan_interval
        self._scandir = scandir
        self._clock = clock
        self.dirs: dict[str, _Dir] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_full = 0.0
        self._seeding = threading.Event() if seeded else None
        self._seed: Listing | None = None

    # -- the thread ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Take the first snapshot and then poll, in a thread of its own (on a slow share the snapshot takes a
        stat per entry: the start-up scan does not wait for it)."""
        since = self._clock()
        self._thread = threading.Thread(target=self._run, args=(since,), name=f"watcher-poll {self.root}", daemon=True)
        self._thread.start()

    def _run(self, since: float) -> None:
        if self._seeding is not None:
            self._seeding.wait()  # set by seed() or stop()
            if self._stop.is_set():
                return
        try:
            if self._seed is not None:
                self.adopt(self._seed)
                self._seed = None
            else:
                self.snapshot(hint_since=since)
        except Exception as exc:
            log.error("poll.failed", folder=self.root, error=f"{type(exc).__name__}: {exc}", next="polling on")
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as exc:  # one bad poll must not end the thread: the next one looks again
                log.error("poll.failed", folder=self.root, error=f"{type(exc).__name__}: {exc}", next="polling on")

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._seeding is not None:
            self._seeding.set()

    # -- a first snapshot from another walk ----------------------------------------------------------------

    def listing(self) -> Listing | None:
        """A :class:`Listing` for a walk of the whole folder to fill and :meth:`seed` back, when this poller still
        waits for its first snapshot; None otherwise."""
        if self._seeding is None or self._seeding.is_set():
            return None
        return Listing(self._clock)

    def seed(self, listing: Listing | None) -> None:
        """Hand over the first snapshot, taken by the caller's walk of the whole folder (None: the walk failed,
        the poller takes its own, hinting the files of directories changed since it started). Any thread; only
        the first call counts."""
        if self._seeding is not None and not self._seeding.is_set():
            self._seed = listing
            self._seeding.set()

    def adopt(self, listing: Listing) -> None:
        """Take ``listing`` as the snapshot, as :meth:`snapshot` would have left it (the next full listing is due
        ``rescan_interval`` from now). Nothing is hinted: the walk that took it compared every file already, and a
        directory changed after its listing has another mtime now, or one recent enough to be listed again."""
        self.dirs = listing.dirs
        self._next_full = self._clock() + self.rescan_interval

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # -- polling -------------------------------------------------------------------------------------------

    def snapshot(self, *, hint_since: float | None = None) -> None:
        """List the whole tree; the next full listing is due ``rescan_interval`` from now.

        Files are not hinted (the start-up scan finds what is there), except, with ``hint_since``, those in a
        directory changed since then: taken while the scan runs, the snapshot may hold a file the scan's
        listing missed, and its directory's mtime says so.
        """
        self.dirs.clear()
        self._list_tree(self.root, hint_since)
        self._next_full = self._clock() + self.rescan_interval

    def poll(self, *, full: bool = False) -> None:
        """One poll: list again the directories that changed (every one when ``full`` or the rescan is due)."""
        now = self._clock()
        if now >= self._next_full:
            full = True
            self._next_full = now + self.rescan_interval
        if self.root not in self.dirs:  # the folder itself was gone (moved away, or a share went): back now?
            self._list_tree(self.root, None)
            if self.root in self.dirs:
                self.hint(self.root, is_dir=True, closed=False)  # everything in it is news: the detector scans it
            return
        for path in list(self.dirs):
            known = self.dirs.get(path)
            if known is None:
                continue  # dropped with a removed parent during this poll
            try:
                st = os.stat(path)
            except FileNotFoundError:
                self._forget(path)
                continue
            except OSError as exc:
                log.debug("poll.stat_failed", path=path, error=exc.strerror)
                continue  # a share hiccup: look again at the next poll
            if not stat.S_ISDIR(st.st_mode):
                self._forget(path)
                continue
            changed = st.st_mtime_ns != known.mtime_ns or st.st_ino != known.inode
            racy = st.st_mtime_ns / 1e9 >= known.listed_at - RECENT_SECONDS  # a later change may share its mtime
            if full or changed or racy:
                self._relist(path, st)

    def _relist(self, path: str, st: os.stat_result) -> None:
        """List ``path`` again: hint new and changed files and new directories, forget what is gone."""
        old = self.dirs.get(path)
        listed_at = self._clock()
        entries = self._list(path)
        if entries is None:
            return
        self.dirs[path] = _Dir(st.st_mtime_ns, st.st_ino, listed_at, entries)
        before = old.entries if old is not None else {}
        for name, entry in entries.items():
            child = os.path.join(path, name)
            was = before.get(name)
            if entry[0]:
                if was is None or not was[0]:
                    self._list_tree(child, None)
                    self.hint(child, is_dir=True, closed=False)  # the detector scans the new directory
            elif was != entry:
                self.hint(child, is_dir=False, closed=False)
        for name, was in before.items():
            if was[0] and (name not in entries or not entries[name][0]):
                self._forget(os.path.join(path, name))

    def _list_tree(self, top: str, hint_since: float | None) -> None:
        """List ``top`` and (when recursive) every directory under it into the snapshot; hint the files of those
        changed since ``hint_since`` (less :data:`RECENT_SECONDS`, for coarse mtimes and clock skew)."""
        stack = [top]
        while stack:
            path = stack.pop()
            if not os.path.isdir(path):
                continue  # gone (or never there): nothing to list
            listed_at = self._clock()
            entries = self._list(path)
            if entries is None:
                continue
            try:  # after the listing: a file made between a stat and the listing would be listed unhinted for good
                st = os.stat(path)
            except OSError:
                continue
            self.dirs[path] = _Dir(st.st_mtime_ns, st.st_ino, listed_at, entries)
            stack.extend(os.path.join(path, name) for name, entry in entries.items() if entry[0])
            if hint_since is not None and st.st_mtime_ns / 1e9 >= hint_since - RECENT_SECONDS:
                for name, entry in entries.items():
                    if not entry[0]:
                        self.hint(os.path.join(path, name), is_dir=False, closed=False)

    def _list(self, path: str) -> dict[str, Entry] | None:
        """The entries of one directory (sub-directories only when recursive); None when it cannot be listed."""
        entries: dict[str, Entry] = {}
        recursive, is_directory = self.recursive, stat.S_ISDIR  # a listing's loop runs once per file of the tree
        try:
            with self._scandir(path) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue  # vanished since the listing
                    is_dir = is_directory(st.st_mode)
                    if is_dir and not recursive:
                        continue  # not watched: the detector would ignore what is in it
                    entries[e.name] = (is_dir, st.st_size, st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.debug("poll.list_failed", path=path, error=exc.strerror)
            return None
        return entries

    def _forget(self, path: str) -> None:
        """Drop a directory that is gone, and everything under it."""
        prefix = path.rstrip(os.sep) + os.sep
        for known in [p for p in self.dirs if p == path or p.startswith(prefix)]:
            del self.dirs[known]
