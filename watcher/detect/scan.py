"""Walking a watched folder for the files already there (at start, on rescans, for `watcher scan`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import structlog

from watcher.detect.filters import PathFilter
from watcher.detect.settle import link_stays_inside

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
            try:
                rel = os.path.relpath(entry.path, root)
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
                    yield entry.path
            except FileNotFoundError:
                continue  # vanished since the listing
            except OSError:
                # a link loop or a target that cannot be resolved: hand it over anyway, so the settler
                # reports it (once) instead of every scan passing over it in silence
                with contextlib.suppress(Exception):
                    if entry.is_symlink() and path_filter.wants_file(os.path.relpath(entry.path, root)):
                        yield entry.path
            except Exception as exc:  # a filter failing on one odd name must not end the whole scan
                log.error("scan.entry_failed", path=entry.path, error=f"{type(exc).__name__}: {exc}", next="skipped")
