"""Which paths in a watched folder can become work: include and exclude patterns, compiled once."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
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


NEVER = "(?!)"
DIR_CACHE = 4096  # folders whose names were checked, remembered for the files in them (a walk asks per file)


def _sources(patterns: Iterable[str]) -> tuple[str, str]:
    """Name patterns (no '/') match any path component; path patterns match the whole relative path."""
    names = [fnmatch.translate(p) for p in patterns if "/" not in p]
    paths = [fnmatch.translate(p.strip("/")) for p in patterns if "/" in p]
    return "|".join(names) or NEVER, "|".join(paths) or NEVER


def _compile(patterns: Iterable[str]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    names, paths = _sources(patterns)
    return re.compile(names, re.IGNORECASE), re.compile(paths, re.IGNORECASE)


class PathFilter:
    """Decides whether a path relative to its watched folder is work (files) or worth entering (folders)."""

    def __init__(self, include: Iterable[str], exclude: Iterable[str] = (), extra_excluded_dirs: Iterable[str] = ()):
        self.include = tuple(include)
        self.exclude = (*ALWAYS_EXCLUDED, *exclude)
        self._inc_name, self._inc_path = _compile(self.include)
        self._exc_name, self._exc_path = _compile(self.exclude)
        self._excluded_dirs = tuple(PurePosixPath(p) for p in extra_excluded_dirs)
        self._excluded_dir_texts = tuple(d.as_posix() for d in self._excluded_dirs)
        # one match for a file's own name: included by name and not excluded by name
        inc_names, _ = _sources(self.include)
        exc_names, exc_paths = _sources(self.exclude)
        self._wanted_name = re.compile(f"(?!(?:{exc_names}))(?:{inc_names})", re.IGNORECASE)
        self._any_exc_path = exc_paths != NEVER
        self._dir_names_excluded: dict[str, bool] = {}

    def __repr__(self) -> str:
        return f"PathFilter(include={list(self.include)!r}, exclude={list(self.exclude)!r})"

    def _excluded(self, rel: str) -> bool:
        """Whether any component, the whole path, or a folder it is in is excluded. A walk asks this for every
        file, so a plain relative path ("a/b.wav") is matched as a string; anything else goes through pathlib."""
        if not _plain(rel):
            return self._excluded_path(PurePosixPath(rel))
        if any(self._exc_name.fullmatch(part) for part in rel.split("/")):
            return True
        if self._exc_path.fullmatch(rel):
            return True
        return any(d == "." or rel == d or rel.startswith(d + "/") for d in self._excluded_dir_texts)

    def _excluded_path(self, rel: PurePosixPath) -> bool:
        if any(self._exc_name.fullmatch(part) for part in rel.parts):
            return True
        if self._exc_path.fullmatch(rel.as_posix()):
            return True
        return any(rel == d or d in rel.parents for d in self._excluded_dirs)

    def wants_dir(self, rel: str) -> bool:
        """False for folders whose contents are never work (``@eaDir``, our own output)."""
        return not self._excluded(rel)

    def wants_file(self, rel: str) -> bool:
        """True when the file matches an include pattern and no exclude pattern."""
        if not _plain(rel):
            path = PurePosixPath(rel)
            if self._excluded_path(path):
                return False
            return bool(self._inc_name.fullmatch(path.name) or self._inc_path.fullmatch(path.as_posix()))
        folder, _, name = rel.rpartition("/")
        if folder and self._names_excluded(folder):
            return False
        if self._any_exc_path and self._exc_path.fullmatch(rel):
            return False
        if self._excluded_dir_texts and any(
            d == "." or rel == d or rel.startswith(d + "/") for d in self._excluded_dir_texts
        ):
            return False
        if self._wanted_name.fullmatch(name):
            return True
        return not self._exc_name.fullmatch(name) and bool(self._inc_path.fullmatch(rel))

    def file_matcher(self, folder: str) -> Callable[[str], object]:
        """:meth:`wants_file` for the names listed in one folder (relative to the watched one, "" for itself):
        ``bool(file_matcher(folder)(name)) == wants_file(folder + "/" + name)`` for any name without "/" (the
        answer is only truthy or not). What holds for the whole folder is decided once, so a walk's usual file
        costs one regular expression."""
        if folder and not _plain(folder):
            return lambda name: self.wants_file(f"{folder}/{name}")
        base = f"{folder}/" if folder else ""
        if (folder and self._names_excluded(folder)) or any(
            d == "." or folder == d or folder.startswith(d + "/") for d in self._excluded_dir_texts
        ):
            return _nothing
        wanted_name = self._wanted_name.fullmatch
        # an own folder's name in this folder ("out" beside the files): a file with that name is excluded
        own = frozenset(
            d[len(base) :] for d in self._excluded_dir_texts if d.startswith(base) and "/" not in d[len(base) :]
        )
        if not own and not self._any_exc_path and self._inc_path.pattern == NEVER:
            return wanted_name  # a match or None
        exc_path = self._exc_path.fullmatch if self._any_exc_path else None
        exc_name, inc_path = self._exc_name.fullmatch, self._inc_path.fullmatch

        def wanted(name: str) -> bool:
            if name in own:
                return False
            rel = base + name
            if exc_path is not None and exc_path(rel):
                return False
            if wanted_name(name):
                return True
            return not exc_name(name) and inc_path(rel) is not None

        return wanted

    def _names_excluded(self, folder: str) -> bool:
        """Whether a component of ``folder`` (a plain relative path) has an excluded name; remembered."""
        found = self._dir_names_excluded.get(folder)
        if found is None:
            found = any(self._exc_name.fullmatch(part) for part in folder.split("/"))
            if len(self._dir_names_excluded) >= DIR_CACHE:
                self._dir_names_excluded.clear()
            self._dir_names_excluded[folder] = found
        return found


def _nothing(name: str) -> bool:
    return False


def _plain(rel: str) -> bool:
    """A relative path as pathlib would write it back (no empty, "." or trailing component), matched as is."""
    return not (
        not rel or rel == "." or rel.startswith(("/", "./")) or rel.endswith(("/", "/.")) or "//" in rel or "/./" in rel
    )
