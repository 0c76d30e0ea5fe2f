"""Walking a watched folder for the files already there (at start, on rescans, for `watcher scan`).

A whole-folder walk is compared with what the store recorded (one answer per folder, :func:`changed_files`), so a
restart over thousands of files already done costs one ``stat`` each and no question to the store.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import structlog

from watcher.detect.filters import PathFilter
from watcher.detect.settle import link_stays_inside

log = structlog.get_logger("watcher.detect")


# path -> (size, mtime_ns, inode) of the version the store holds; an inode of None is not compared
Recorded = Mapping[str, tuple[int, int, int | None]]


def walk(root: str, path_filter: PathFilter, *, recursive: bool = True, start: str | None = None) -> Iterator[str]:
    """Yield the absolute paths of wanted files under ``start`` (default: ``root``); unreadable folders are logged."""
    for entry in walk_entries(root, path_filter, recursive=recursive, start=start):
        yield entry.path


def changed_files(
    root: str, path_filter: PathFilter, recorded: Recorded, *, recursive: bool = True, start: str | None = None
) -> tuple[list[str], int]:
    """The wanted files under ``start`` that are not in ``recorded`` as they are now (new, changed, or not
    stat-able: the settler looks at those), and how many wanted files the walk saw.

    The same walk as :func:`walk_entries`, written for a restart over many files already recorded: the filter is
    asked once per folder (:meth:`PathFilter.file_matcher`), each folder is listed through a descriptor (a file's
    ``stat`` then resolves its name only, not the whole path), and an unchanged file costs a ``stat``, a regular
    expression and a dictionary look-up.
    """
    changed: list[str] = []
    seen = 0
    get = recorded.get
    stack = [start or root]
    while stack:
        current = stack.pop()
        folder = "" if current == root else os.path.relpath(current, root)
        prefix = current if current.endswith(os.sep) else current + os.sep
        try:
            fd = os.open(current, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("scan.folder_unreadable", path=current, error=exc.strerror, next="skipped until the next scan")
            continue
        try:  # the entries' stat() goes through ``fd``: it stays open until the folder is done
            try:
                with os.scandir(fd) as it:
                    entries = list(it)
            except OSError as exc:
                log.warning(
                    "scan.folder_unreadable", path=current, error=exc.strerror, next="skipped until the next scan"
                )
                continue
            wanted = path_filter.file_matcher(folder)
            for entry in entries:
                name = entry.name
                path = prefix + name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if recursive and path_filter.wants_dir(f"{folder}/{name}" if folder else name):
                            stack.append(path)
                        continue
                    if not (entry.is_file() and wanted(name)):
                        continue
                    if entry.is_symlink() and not link_stays_inside(path, root):
                        log.warning(
                            "scan.link_outside",
                            path=path,
                            reason="a symbolic link to a file outside the watched folder",
                            next="not processed",
                        )
                        continue
                except FileNotFoundError:
                    continue  # vanished since the listing
                except OSError:
                    # a link loop or a target that cannot be resolved: hand it over anyway, so the settler
                    # reports it (once) instead of every scan passing over it in silence
                    with contextlib.suppress(Exception):
                        if entry.is_symlink() and wanted(name):
                            seen += 1
                            changed.append(path)
                    continue
                except Exception as exc:  # a filter failing on one odd name must not end the whole scan
                    log.error("scan.entry_failed", path=path, error=f"{type(exc).__name__}: {exc}", next="skipped")
                    continue
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
        finally:
            os.close(fd)
    return changed, seen


def walk_entries(
    root: str, path_filter: PathFilter, *, recursive: bool = True, start: str | None = None
) -> Iterator[os.DirEntry[str]]:
    """:func:`walk`, yielding each wanted file's directory entry (its ``stat()`` is cached)."""
    stack = [start or root]
    while stack:
        current = stack.pop()
        # paths relative to the folder, built by joining names: one relpath per folder, not one per file
        base = "" if current == root else os.path.relpath(current, root) + os.sep
        try:
            with os.scandir(current) as it:
                entries = list(it)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("scan.folder_unreadable", path=current, error=exc.strerror, next="skipped until the next scan")
            continue
        for entry in entries:
            try:
                rel = base + entry.name
                if entry.is_dir(follow_symlinks=False):
                    if recursive and path_filter.wants_dir(rel):
                        stack.append(entry.path)
                elif entry.is_file() and path_filter.wants_file(rel):
                    if entry.is_symlink() and not link_stays_inside(entry.path, root):
                        log.warning(
                            "scan.link_outside",
                            path=entry.path,
                            reason="a symbolic link to a file outside the watched folder",
                            next="not processed",
                        )
                        continue
                    yield entry
            except FileNotFoundError:
                continue  # vanished since the listing
            except OSError:
                # a link loop or a target that cannot be resolved: hand it over anyway, so the settler
                # reports it (once) instead of every scan passing over it in silence
                with contextlib.suppress(Exception):
                    if entry.is_symlink() and path_filter.wants_file(os.path.relpath(entry.path, root)):
                        yield entry
            except Exception as exc:  # a filter failing on one odd name must not end the whole scan
                log.error("scan.entry_failed", path=entry.path, error=f"{type(exc).__name__}: {exc}", next="skipped")
