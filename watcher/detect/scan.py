"""Walking a watched folder for the files already there (at start, on rescans, for `watcher scan`).

A whole-folder walk is compared with what the store recorded (one answer per folder, grouped by sub-folder:
:func:`changed_files`), so a restart over thousands of files already done costs one ``stat`` each and no question
to the store.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from stat import S_ISDIR, S_ISREG

import structlog

from watcher.detect.filters import PathFilter
from watcher.detect.poll import Entry, Listing
from watcher.detect.settle import link_stays_inside
from watcher.fsutil import TEMP_PREFIX

log = structlog.get_logger("watcher.detect")


# one folder's recorded files: name -> (size, mtime_ns, inode) of the revision the store holds; an inode of None
# is not compared
Known = Mapping[str, tuple[int, int, int | None]]
# the store's answer for one watched folder: each folder's absolute path (as a walk writes it, no trailing
# separator) -> what is recorded in it. Grouped so that a walk looks a file up by the name it listed, in its own
# folder's small table.
Recorded = Mapping[str, Known]
# shown each entry named ``.watcher-tmp-*`` a walk lists (its path and entry); True when it removed it
Sweep = Callable[[str, os.DirEntry[str]], bool]
_NOTHING: Known = {}


def walk(root: str, path_filter: PathFilter, *, recursive: bool = True, start: str | None = None) -> Iterator[str]:
    """Yield the absolute paths of wanted files under ``start`` (default: ``root``); unreadable folders are logged."""
    for path, _ in walk_entries(root, path_filter, recursive=recursive, start=start):
        yield path


def changed_files(
    root: str,
    path_filter: PathFilter,
    recorded: Recorded,
    *,
    recursive: bool = True,
    start: str | None = None,
    listing: Listing | None = None,
    sweep: Sweep | None = None,
) -> tuple[list[str], int]:
    """The wanted files under ``start`` that are not in ``recorded`` as they are now (new, changed, or not
    stat-able: the settler looks at those), and how many files the walk saw that are wanted or recorded as they
    are (a file recorded as it is costs no question to the filter).

    Written for a restart over many files already recorded: an unchanged file costs a ``stat``, a regular
    expression and a look-up by its name. ``listing``: the walk also takes a poller's first snapshot; ``sweep``:
    it also shows the start-up sweep the temp files it lists (:func:`walk_entries`).
    """
    walker = _Walk(root, path_filter, listing, sweep, recorded, recursive=recursive)
    changed = [path for path, _ in walker.entries(start or root)]
    return changed, walker.seen


def walk_entries(
    root: str,
    path_filter: PathFilter,
    *,
    recursive: bool = True,
    start: str | None = None,
    listing: Listing | None = None,
    sweep: Sweep | None = None,
) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Each wanted file under ``start`` (default: ``root``) as its absolute path and its directory entry.

    The entry's ``stat()`` is valid only until the next item: each folder is listed through a descriptor (a
    file's ``stat`` then resolves its name only, not the whole path, as ``find`` does), closed when the folder
    is done. The filter is asked once per folder (:meth:`PathFilter.file_matcher`), so a file costs one regular
    expression. A link that cannot be resolved is yielded anyway (its ``stat()`` raises), so the settler reports
    it once instead of every scan passing over it in silence.

    With ``listing`` the walk also takes a polled folder's first snapshot (:class:`~watcher.detect.poll.Listing`),
    so the tree is walked once: every folder is listed, those the filter excludes too (their files are not
    yielded), and every entry's ``lstat`` is recorded. A regular file's ``stat()`` is then that same reading; a
    link's is still its target's.

    With ``sweep`` every entry named ``.watcher-tmp-*`` in a folder the walk lists is shown to it first (the
    start-up sweep of a watched folder rides on the start-up scan's listing), and the folders the filter excludes
    are listed too, for that only (a link is never followed). One it removed is neither yielded nor recorded.
    """
    return _Walk(root, path_filter, listing, sweep, None, recursive=recursive).entries(start or root)


class _Walk:
    """One walk of a watched folder (see :func:`walk_entries`); with ``recorded``, a file recorded as it is now is
    counted in ``seen`` but not yielded (:func:`changed_files`)."""

    def __init__(
        self,
        root: str,
        path_filter: PathFilter,
        listing: Listing | None,
        sweep: Sweep | None,
        recorded: Recorded | None,
        *,
        recursive: bool,
    ) -> None:
        self.root, self.path_filter, self.recursive = root, path_filter, recursive
        self.listing, self.sweep, self.recorded = listing, sweep, recorded
        self.seen = 0  # wanted files, yielded or not
        self.stack: list[tuple[str, bool]] = []  # folders still to list, with whether the filter wants them

    def entries(self, start: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
        self.stack.append((start, True))
        while self.stack:
            current, wanted_here = self.stack.pop()
            fd = _open_folder(current)
            if fd is None:
                continue
            try:  # the entries' stat() goes through ``fd``: it stays open until the folder is done
                if self.listing is not None:
                    yield from self._list_folder(fd, current, wanted_here=wanted_here)
                else:
                    yield from self._walk_folder(fd, current, wanted_here=wanted_here)
            finally:
                os.close(fd)

    def _matcher(self, current: str, *, wanted_here: bool) -> tuple[str, Callable[[str], object] | None]:
        """The folder's path relative to the root, and the filter's matcher for its files (None: none wanted)."""
        folder = "" if current == self.root else os.path.relpath(current, self.root)
        return folder, self.path_filter.file_matcher(folder) if wanted_here else None

    def _known(self, current: str) -> Known:
        """What the store recorded in this folder (by name), or nothing."""
        if self.recorded is None:
            return _NOTHING
        return self.recorded.get(current.rstrip(os.sep) or os.sep, _NOTHING)

    def _changed(self, known: Known, name: str, entry: os.DirEntry[str]) -> bool:
        """Whether a wanted file is to be looked at (counted in ``seen``): not recorded as it is now."""
        self.seen += 1
        return not _unchanged(known, name, entry)

    def _walk_folder(self, fd: int, current: str, *, wanted_here: bool) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """One folder of a walk without a snapshot: wanted files yielded, folders the filter wants onto the stack
        (with ``sweep``, the others too, to be listed for the sweep only). A regular file recorded as it is now is
        passed over before the filter is asked (see :meth:`_list_folder`)."""
        folder, wanted = self._matcher(current, wanted_here=wanted_here)
        prefix = current if current.endswith(os.sep) else current + os.sep
        known, sweep, recursive = self._known(current), self.sweep, self.recursive
        for entry in _entries(fd, current):
            name = entry.name
            if wanted is not None and name in known and _regular(entry) and _unchanged(known, name, entry):
                self.seen += 1
                continue
            path = prefix + name
            if sweep is not None and name.startswith(TEMP_PREFIX) and sweep(path, entry):
                continue
            what = None
            if wanted is not None:
                what = _what_of(entry, path, self.root, folder, wanted, self.path_filter, recursive=recursive)
            if what == "descend":
                self.stack.append((path, True))
            elif what == "yield":
                if self.recorded is None or self._changed(known, name, entry):
                    yield path, entry
            elif sweep is not None and recursive and _is_folder(entry):
                self.stack.append((path, False))  # excluded: listed for the sweep only

    def _list_folder(self, fd: int, current: str, *, wanted_here: bool) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """One folder of a walk that takes a poller's snapshot: each entry's ``lstat`` into the listing, sub-folders
        onto the stack (wanted or not), wanted files yielded; a regular file decided here, the rest by _what_of.

        A regular file recorded as it is now is passed over before the filter is asked (it would not be yielded
        whatever the filter says; it counts in ``seen`` even when a changed filter no longer wants it)."""
        assert self.listing is not None
        listed_at = self.listing.clock()
        folder, wanted = self._matcher(current, wanted_here=wanted_here)
        prefix = current if current.endswith(os.sep) else current + os.sep
        known, sweep, recursive, stack = self._known(current), self.sweep, self.recursive, self.stack
        counting = self.recorded is not None
        entries: dict[str, Entry] = {}
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    name = entry.name
                    if sweep is not None and name.startswith(TEMP_PREFIX) and sweep(prefix + name, entry):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        mode = 0  # vanished since the listing: not in the snapshot (the poller leaves it out too)
                    else:
                        mode = st.st_mode
                        if S_ISREG(mode):
                            size, mtime_ns, inode = st.st_size, st.st_mtime_ns, st.st_ino
                            entries[name] = (False, size, mtime_ns, inode)
                            if wanted is None:
                                continue
                            old = known.get(name)  # a regular file's stat() is this lstat: compared here
                            if old is not None and old[0] == size and old[1] == mtime_ns and old[2] in (None, inode):
                                self.seen += 1
                                continue
                            try:
                                take = wanted(name)
                            except Exception as exc:
                                take = _filter_failed(prefix + name, exc)
                            if take:
                                self.seen += counting
                                yield prefix + name, entry
                            continue
                        if recursive or not S_ISDIR(mode):
                            entries[name] = (S_ISDIR(mode), st.st_size, st.st_mtime_ns, st.st_ino)
                    path = prefix + name
                    what = None
                    if wanted is not None:
                        what = _what_of(entry, path, self.root, folder, wanted, self.path_filter, recursive=recursive)
                    if what == "yield":
                        if not counting or self._changed(known, name, entry):
                            yield path, entry
                    elif recursive and S_ISDIR(mode):
                        stack.append((path, what == "descend"))  # an excluded folder is listed for the poller only
        except OSError as exc:  # a folder whose listing broke off is left out, to be listed again by the poller
            log.warning("scan.folder_unreadable", path=current, error=exc.strerror, next="skipped until the next scan")
            return
        self.listing.add(current, listed_at, os.fstat(fd), entries)


def _entries(fd: int, path: str) -> Iterator[os.DirEntry[str]]:
    """The entries of the folder open as ``fd`` (at ``path``), one at a time: a folder of 100,000 files is never
    held as a list, so a scan's memory does not grow with the folder. A listing that fails is logged and ends."""
    try:
        with os.scandir(fd) as it:
            yield from it
    except OSError as exc:
        log.warning("scan.folder_unreadable", path=path, error=exc.strerror, next="skipped until the next scan")


def _unchanged(known: Known, name: str, entry: os.DirEntry[str]) -> bool:
    """Whether the file is recorded as its ``stat`` (a link's target's, as the settler's) says it is now."""
    old = known.get(name)
    if old is None:
        return False
    try:
        st = entry.stat()
    except OSError:
        return False
    return st.st_size == old[0] and st.st_mtime_ns == old[1] and (old[2] is None or old[2] == st.st_ino)


def _regular(entry: os.DirEntry[str]) -> bool:
    """Whether the entry is a regular file itself (not a link to one); False when that cannot be told."""
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


def _is_folder(entry: os.DirEntry[str]) -> bool:
    """Whether the entry is a folder itself (not a link to one); False when that cannot be told."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _filter_failed(path: str, exc: Exception) -> bool:
    """A filter that failed on one odd name: said once in the log; the file is skipped (False)."""
    log.error("scan.entry_failed", path=path, error=f"{type(exc).__name__}: {exc}", next="skipped")
    return False


def _open_folder(current: str) -> int | None:
    """An open descriptor of the folder ``current`` (the caller closes it), or None when the folder is gone or
    cannot be opened (then said in the log)."""
    try:
        return os.open(current, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("scan.folder_unreadable", path=current, error=exc.strerror, next="skipped until the next scan")
        return None


def _what_of(
    entry: os.DirEntry[str],
    path: str,
    root: str,
    folder: str,
    wanted: Callable[[str], object],
    path_filter: PathFilter,
    *,
    recursive: bool,
) -> str | None:
    """What the walk does with one entry: ``descend`` into it, ``yield`` it, or None (skip it)."""
    name = entry.name
    try:
        if entry.is_dir(follow_symlinks=False):
            descend = recursive and path_filter.wants_dir(f"{folder}/{name}" if folder else name)
            return "descend" if descend else None
        if not (entry.is_file() and wanted(name)):
            return None
        if entry.is_symlink() and not link_stays_inside(path, root):
            log.warning(
                "scan.link_outside",
                path=path,
                reason="a symbolic link to a file outside the watched folder",
                next="not processed",
            )
            return None
    except FileNotFoundError:
        return None  # vanished since the listing
    except OSError:
        # a link loop or a target that cannot be resolved: yielded (see walk_entries)
        unresolved = False
        with contextlib.suppress(Exception):
            unresolved = entry.is_symlink() and bool(wanted(name))
        return "yield" if unresolved else None
    except Exception as exc:  # a filter failing on one odd name must not end the whole scan
        log.error("scan.entry_failed", path=path, error=f"{type(exc).__name__}: {exc}", next="skipped")
        return None
    return "yield"
