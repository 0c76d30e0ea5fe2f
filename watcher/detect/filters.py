"""Which paths in a watched folder can become work: include and exclude patterns, compiled once."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from pathlib import PurePosixPath

# Temp and OS files that are never work, whatever the configuration says.
ALWAYS_EXCLUDED = (
    "*.part",
    "*.partial",
    "*.tmp",
    "*.temp",
    "*.crdownload",
    "*.download",
    "._*",
    ".DS_Store",
    "~$*",
    ".~lock.*",
    "Thumbs.db",
    "desktop.ini",
    "@eaDir",
    "#recycle",
    "$RECYCLE.BIN",
    ".Trash*",
    ".nfs*",
    ".syncthing.*",
    ".*.??????",  # rsync's in-progress temp name: .track.wav.Ab12Cd
    ".watcher-tmp-*",  # our own temp files and folders
)


def _compile(patterns: Iterable[str]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """Name patterns (no '/') match any path component; path patterns match the whole relative path."""
    names = [fnmatch.translate(p) for p in patterns if "/" not in p]
    paths = [fnmatch.translate(p.strip("/")) for p in patterns if "/" in p]
    never = "(?!)"
    return (
        re.compile("|".join(names) or never, re.IGNORECASE),
        re.compile("|".join(paths) or never, re.IGNORECASE),
    )


class PathFilter:
    """Decides whether a path relative to its watched folder is work (files) or worth entering (folders)."""

    def __init__(self, include: Iterable[str], exclude: Iterable[str] = (), extra_excluded_dirs: Iterable[str] = ()):
        self.include = tuple(include)
        self.exclude = (*ALWAYS_EXCLUDED, *exclude)
        self._inc_name, self._inc_path = _compile(self.include)
        self._exc_name, self._exc_path = _compile(self.exclude)
        self._excluded_dirs = tuple(PurePosixPath(p) for p in extra_excluded_dirs)

    def __repr__(self) -> str:
        return f"PathFilter(include={list(self.include)!r}, exclude={list(self.exclude)!r})"

    def _excluded(self, rel: PurePosixPath) -> bool:
        if any(self._exc_name.fullmatch(part) for part in rel.parts):
            return True
        if self._exc_path.fullmatch(rel.as_posix()):
            return True
        return any(rel == d or d in rel.parents for d in self._excluded_dirs)

    def wants_dir(self, rel: str) -> bool:
        """False for folders whose contents are never work (``@eaDir``, our own output)."""
        return not self._excluded(PurePosixPath(rel))

    def wants_file(self, rel: str) -> bool:
        """True when the file matches an include pattern and no exclude pattern."""
        p = PurePosixPath(rel)
        if self._excluded(p):
            return False
        return bool(self._inc_name.fullmatch(p.name) or self._inc_path.fullmatch(p.as_posix()))
