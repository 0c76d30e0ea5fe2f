"""Walking a watched folder for the files already there (at start, on rescans, for `watcher scan`).

A whole-folder walk is compared with what the store recorded (one answer per folder, :func:`changed_files`), so a
restart over thousands of files already done costs one ``stat`` each and no question to the store.
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

log = structlog.get_logger("watcher.detect")


# path -> (size, mtime_ns, inode) of the revision the store holds; an inode of None is not compared
Recorded = Mapping[str, tuple[int, int, int | None]]


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
) -> tuple[list[str], int]:
    """The wanted files under ``start`` that are not in ``recorded`` as they are now (new, changed, or not
    stat-able: the settler looks at those), and how many wanted files the walk saw.

    Written for a restart over many files already recorded: an unchanged file costs a ``stat``, a regular
    expression and a dictionary look-up. ``listing``: the walk also takes a poller's first snapshot
    (:func:`walk_entries`).
    """
    changed: list[str] = []
    seen = 0
    get = recorded.get
    for path, entry in walk_entries(root, path_filter, recursive=recursive, start=start, listing=listing):
        seen += 1
        old = get(path)
        if old is not None:
            try:
                st = entry.stat()  # follows a link, as the settler's stat does
            except OSError:
                pass
            else:
                size, mtime_ns, inode = old
                if st.st_size == size and st.st_mtime_ns == mtime_ns and (inode is None or inode == st.st_ino):
                    continue
        changed.append(path)
    return changed, seen


def _entries(fd: int, path: str) -> Iterator[os.DirEntry[str]]:
    """The entries of the folder open as ``fd`` (at ``path``), one at a time: a folder of 100,000 files is never
    held as a list, so a scan's memory does not grow with the folder. A listing that fails is logged and ends."""
    try:
        with os.scandir(fd) as it:
            yield from it
    except OSError as exc:
        log.warning("scan.folder_unreadable", path=path, error=exc.strerror, next="skipped until the next scan")


def walk_entries(
    root: str,
    path_filter: PathFilter,
    *,
    recursive: bool = True,
    start: str | None = None,
    listing: Listing | None = None,
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
    """
    stack = [(start or root, True)]
    while stack:
        current, wanted_here = stack.pop()
        folder = "" if current == root else os.path.relpath(current, root)
        prefix = current if current.endswith(os.sep) else current + os.sep
        fd = _open_folder(current)
        if fd is None:
            continue
        try:  # the entries' stat() goes through ``fd``: it stays open until the folder is done
            if listing is not None:
                yield from _list_folder(
                    fd, current, root, folder, listing, stack, path_filter, wanted_here=wanted_here, recursive=recursive
                )
                continue
            wanted = path_filter.file_matcher(folder)
            for entry in _entries(fd, current):
                path = prefix + entry.name
                what = _what_of(entry, path, root, folder, wanted, path_filter, recursive=recursive)
                if what == "descend":
                    stack.append((path, True))
                elif what == "yield":
                    yield path, entry
        finally:
            os.close(fd)


def _list_folder(
    fd: int,
    current: str,
    root: str,
    folder: str,
    listing: Listing,
    stack: list[tuple[str, bool]],
    path_filter: PathFilter,
    *,
    wanted_here: bool,
    recursive: bool,
) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """One folder of a walk that takes a poller's snapshot (see :func:`walk_entries`): each entry's ``lstat`` into
    ``listing``, sub-folders onto ``stack`` (with whether the filter wants them), wanted files yielded. A regular
    file is decided here (its loop runs once per file of the tree); any other entry as :func:`_what_of` says."""
    prefix = current if current.endswith(os.sep) else current + os.sep
    listed_at = listing.clock()
    entries: dict[str, Entry] = {}
    wanted = path_filter.file_matcher(folder) if wanted_here else None
    try:
        with os.scandir(fd) as it:
            for entry in it:
                name = entry.name
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    mode = 0  # vanished since the listing: not in the snapshot (the poller leaves it out too)
                else:
                    mode = st.st_mode
                    if S_ISREG(mode):
                        entries[name] = (False, st.st_size, st.st_mtime_ns, st.st_ino)
                        if wanted is not None:
                            try:
                                take = wanted(name)
                            except Exception as exc:
                                take = _filter_failed(prefix + name, exc)
                            if take:
                                yield prefix + name, entry
                        continue
                    if recursive or not S_ISDIR(mode):
                        entries[name] = (S_ISDIR(mode), st.st_size, st.st_mtime_ns, st.st_ino)
                path = prefix + name
                what = None
                if wanted is not None:
                    what = _what_of(entry, path, root, folder, wanted, path_filter, recursive=recursive)
                if what == "yield":
                    yield path, entry
                elif recursive and S_ISDIR(mode):
                    stack.append((path, what == "descend"))  # an excluded folder is listed for the poller only
    except OSError as exc:  # a folder whose listing broke off is left out, to be listed again by the poller
        log.warning("scan.folder_unreadable", path=current, error=exc.strerror, next="skipped until the next scan")
        return
    listing.add(current, listed_at, os.fstat(fd), entries)


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
