"""Walking a watched folder for the files already there (at start, on rescans, for `watcher scan`).

A whole-folder walk is compared with what the store recorded (one answer per folder, :func:`changed_files`), so a
restart over thousands of files already done costs one ``stat`` each and no question to the store.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping

import structlog

from watcher.detect.filters import PathFilter
from watcher.detect.settle import link_stays_inside

log = structlog.get_logger("watcher.detect")


# path -> (size, mtime_ns, inode) of the revision the store holds; an inode of None is not compared
Recorded = Mapping[str, tuple[int, int, int | None]]


def walk(root: str, path_filter: PathFilter, *, recursive: bool = True, start: str | None = None) -> Iterator[str]:
    """Yield the absolute paths of wanted files under ``start`` (default: ``root``); unreadable folders are logged."""
    for path, _ in walk_entries(root, path_filter, recursive=recursive, start=start):
        yield path


def changed_files(
    root: str, path_filter: PathFilter, recorded: Recorded, *, recursive: bool = True, start: str | None = None
) -> tuple[list[str], int]:
    """The wanted files under ``start`` that are not in ``recorded`` as they are now (new, changed, or not
    stat-able: the settler looks at those), and how many wanted files the walk saw.

    Written for a restart over many files already recorded: an unchanged file costs a ``stat``, a regular
    expression and a dictionary look-up.
    """
    changed: list[str] = []
    seen = 0
    get = recorded.get
    for path, entry in walk_entries(root, path_filter, recursive=recursive, start=start):
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
    root: str, path_filter: PathFilter, *, recursive: bool = True, start: str | None = None
) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Each wanted file under ``start`` (default: ``root``) as its absolute path and its directory entry.

    The entry's ``stat()`` is valid only until the next item: each folder is listed through a descriptor (a
    file's ``stat`` then resolves its name only, not the whole path, as ``find`` does), closed when the folder
    is done. The filter is asked once per folder (:meth:`PathFilter.file_matcher`), so a file costs one regular
    expression. A link that cannot be resolved is yielded anyway (its ``stat()`` raises), so the settler reports
    it once instead of every scan passing over it in silence.
    """
    stack = [start or root]
    while stack:
        current = stack.pop()
        folder = "" if current == root else os.path.relpath(current, root)
        prefix = current if current.endswith(os.sep) else current + os.sep
        fd = _open_folder(current)
        if fd is None:
            continue
        try:  # the entries' stat() goes through ``fd``: it stays open until the folder is done
            wanted = path_filter.file_matcher(folder)
            for entry in _entries(fd, current):
                path = prefix + entry.name
                what = _what_of(entry, path, root, folder, wanted, path_filter, recursive=recursive)
                if what == "descend":
                    stack.append(path)
                elif what == "yield":
                    yield path, entry
        finally:
            os.close(fd)


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
