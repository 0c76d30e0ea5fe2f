"""Walking a watched folder for the files already there (at start, on rescans, for `watcher scan`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import structlog

from watcher.detect.filters import PathFilter

log = structlog.get_logger("watcher.detect")


def walk(root: str, path_filter: PathFilter, *, recursive: bool = True, start: str | None = None) -> Iterator[str]:
    """Yield the absolute paths of wanted files under ``start`` (default: ``root``); unreadable folders are logged."""
    stack = [start or root]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as it:
                entries = list(it)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("scan.folder_unreadable", path=current, error=exc.strerror, next="skipped until the next scan")
            continue
        for entry in entries:
            rel = os.path.relpath(entry.path, root)
            try:
                if entry.is_dir(follow_symlinks=False):
                    if recursive and path_filter.wants_dir(rel):
                        stack.append(entry.path)
                elif entry.is_file() and path_filter.wants_file(rel):
                    yield entry.path
            except OSError:
                continue
