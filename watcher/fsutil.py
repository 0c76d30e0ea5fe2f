"""File-system helpers: atomic writes, modes that follow the umask, safe names, crash-safe moves, the state lock.

Outputs for people (sidecars, manifests, delivered files) get ``0o666 & ~umask`` (folders ``0o777 & ~umask``);
temp files stay private (0600) until they are renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
import unicodedata
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".watcher-tmp-"
PRIVATE_FILE = 0o600
NODE_ID_FILE = "node-id"
_NODE_ID = re.compile(r"[0-9a-f]{16}")
# a temp name carries its node and, since 0.3, the life (process) that made it: ``.watcher-tmp-n<node>l<life>-``
_TAGGED = re.compile(r"\.watcher-tmp-n([0-9a-f]{16})(?:l([0-9a-f]{8}))?-")
STALE_TEMP_SECONDS = 86400.0  # another node's temp file whose node's life cannot be told is swept after this
_node = ""  # this process's node ID once the daemon (or `scan`) started: temp names carry it
_life = ""  # this process's life, beside the node in temp names: a sweep spares the temp files of its own life


def node_id(state_dir: Path) -> str:
    """This node's identity: generated once, kept in ``state_dir/node-id``. Its name is for people; this is what
    leases, gate entries and temp names carry, so two machines sharing a name (a cloned VM) stay two nodes."""
    path = state_dir / NODE_ID_FILE
    with contextlib.suppress(OSError, UnicodeDecodeError):
        kept = path.read_text(encoding="ascii").strip()
        if _NODE_ID.fullmatch(kept):
            return kept
    made = uuid.uuid4().hex[:16]
    write_bytes_atomic(path, f"{made}\n".encode())
    return made


def use_node(node: str) -> None:
    """Temp files and staging folders made from now on carry ``node`` and this process's life (see
    :class:`Leftovers`); the life stays the same for the whole process, across reloads."""
    global _node, _life
    _node = node
    _life = _life or uuid.uuid4().hex[:8]


def temp_prefix() -> str:
    """The start of every temp name this process makes: ``.watcher-tmp-n<node ID>l<life>-`` once the node is
    known."""
    return f"{TEMP_PREFIX}n{_node}l{_life}-" if _node else TEMP_PREFIX


def _read_umask() -> int:
    """The process umask, read without changing it (Linux), else by setting and restoring it once at import."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # macOS: no /proc; at import no other thread of ours creates files yet
    os.umask(mask)
    return mask


UMASK = _read_umask()


def file_mode() -> int:
    """The mode of an output file for people: what ``open()`` would give under the process umask."""
    return 0o666 & ~UMASK


def dir_mode() -> int:
    """The mode of an output folder for people."""
    return 0o777 & ~UMASK


def chmod_quietly(path: str | os.PathLike[str] | int, mode: int) -> None:
    """chmod (or fchmod for an fd) where the filesystem allows it: some shares refuse or ignore modes."""
    with contextlib.suppress(OSError):
        if isinstance(path, int):
            os.fchmod(path, mode)
        else:
            os.chmod(path, mode)


def publish_tree(root: Path) -> None:
    """Give ``root`` and everything under it the output modes (before it is renamed into place)."""
    chmod_quietly(root, dir_mode())
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            chmod_quietly(os.path.join(folder, name), dir_mode())
        for name in files:
            chmod_quietly(os.path.join(folder, name), file_mode())


MAX_COMPONENT_BYTES = 255
_UNSAFE = re.compile(r"[/\\]")
_DOTS = re.compile(r"\.{2,}")


def safe_component(name: str, fallback: str) -> str:
    """``name`` (from the network) as one safe file name: never a path, never hidden, never an option.

    Separators become ``_``, control characters and undecodable bytes go, runs of dots become one dot,
    leading dots, dashes and spaces and trailing dots and spaces go, and the result is cut to 255 UTF-8
    bytes keeping its extension. An empty result gives ``fallback`` (itself made safe; it may be empty).
    """
    text = "".join("_" if unicodedata.category(c) in ("Cc", "Cs") else c for c in name)
    text = _DOTS.sub(".", _UNSAFE.sub("_", text)).lstrip(". -_\u00a0").rstrip(". ")
    if not text.strip("_"):
        return safe_component(fallback, "") if fallback else ""
    return _truncate(text, MAX_COMPONENT_BYTES)


def _truncate(name: str, limit: int) -> str:
    """``name`` cut to ``limit`` UTF-8 bytes on a character boundary, keeping a short extension."""
    if len(name.encode("utf-8")) <= limit:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot or len(suffix.encode("utf-8")) > 16 or not stem:
        stem, suffix = name, ""
    tail = f".{suffix}" if suffix else ""
    room = limit - len(tail.encode("utf-8"))
    cut = stem.encode("utf-8")[:room].decode("utf-8", "ignore")
    return cut + tail


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where folders cannot be opened, e.g. some shares)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old file or the new one, never a mix.

    On failure (a full disk) the temp file is removed and the old file is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            chmod_quietly(fh.fileno(), file_mode())  # private (mkstemp: 0600) until complete
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, payload: Any) -> None:
    """``payload`` as indented UTF-8 JSON, written like :func:`write_bytes_atomic` (mode from the umask).

    A string holding undecodable bytes of a file name (surrogate escapes) is written as JSON ``\\udcXX`` escapes,
    which read back to the same string: the file stays valid UTF-8 JSON whatever the names.
    """
    text = json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8", "backslashreplace"))


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A JSON object from disk (a sidecar, a manifest, a state file), or None when it is missing, unreadable or not
    an object: every reader of our own files treats those alike."""
    try:
        doc = json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def free_name(path: Path) -> Path:
    """``path`` if nothing is there, else ``stem.N.suffix`` with the first free N (1, 2, ...)."""
    candidate, n = path, 1
    while os.path.lexists(candidate):
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        n += 1
    return candidate


def _rename_no_replace(src: Path, dst: Path) -> Path:
    """Rename ``src`` to ``dst`` or the next free name, never over an existing file; returns where it went.

    A hard link claims the name atomically (EEXIST if taken); where links are not supported, the name is
    checked first and renamed (a narrow race, on filesystems that offer nothing better).
    """
    while True:
        target = free_name(dst)
        try:
            os.link(src, target, follow_symlinks=False)
        except FileExistsError:
            continue  # taken between the check and the link: try the next name
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise
            os.rename(src, target)  # no hard links here (some shares): check-then-rename
            return target
        os.unlink(src)
        return target


def move_file(src: Path, dst: Path) -> Path:
    """Move ``src`` to ``dst`` (or ``stem.N.suffix`` when taken) so that a crash never loses or halves it.

    Same device: a rename. Across devices: copy to a private temp name in the destination folder, fsync,
    rename into place, fsync the folder, then remove the source. A failure (a full disk) leaves the source
    untouched and no temp file behind, and raises the OSError. Returns the final path.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _rename_no_replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=dst.suffix, dir=dst.parent)
    try:
        with open(src, "rb") as source, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        shutil.copystat(src, tmp)  # the mode and mtime travel with the file, as with mv
        final = _rename_no_replace(Path(tmp), dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(final.parent)
    os.unlink(src)
    fsync_dir(src.parent)
    return final


class Leftovers:
    """What a start-up sweep removes of the temp files (``.watcher-tmp-*`` files and folders) it is shown: this
    node's (``mine``) from an earlier life (this process's own are being written), and another node's only once it
    is dead (``alive(node)`` False; None when the store cannot tell, then only when untouched for
    :data:`STALE_TEMP_SECONDS`, as are names from before temp names carried a node). Links are never followed.

    Called with each entry named ``.watcher-tmp-*`` (by :meth:`sweep`, or by the start-up scan's walk of a watched
    folder, which lists it anyway); ``removed`` lists what went.
    """

    def __init__(self, *, mine: str, alive: Callable[[str], bool | None] = lambda node: None) -> None:
        self.mine = mine
        self.alive = alive
        self.removed: list[Path] = []
        self._verdicts: dict[str, bool | None] = {}
        self._stale_before = time.time() - STALE_TEMP_SECONDS

    def __call__(self, path: str, entry: os.DirEntry[str]) -> bool:
        """Remove the temp entry at ``path`` if it is a leftover; whether it went. Never raises."""
        try:
            if not self._leftover(entry):
                return False
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        except OSError:
            return False
        self.removed.append(Path(path))
        return True

    def sweep(self, roots: list[tuple[Path, bool]]) -> list[Path]:
        """Remove the leftovers under each ``(root, recursive)``; returns what this call removed. The daemon sweeps
        so, at start-up and holding its state folder's lock, the folders it writes into that its start-up scan
        does not walk: an output folder several nodes share keeps the staging folders of the others."""
        before = len(self.removed)
        for root, recursive in roots:
            stack = [root]
            while stack:
                folder = stack.pop()
                try:
                    with os.scandir(folder) as entries:
                        found = list(entries)
                except OSError:
                    continue
                for entry in found:  # a plain loop, no context manager per entry: a folder may hold 100,000 files
                    try:
                        if entry.name.startswith(TEMP_PREFIX):
                            self(entry.path, entry)
                        elif recursive and entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                    except OSError:
                        continue
        return self.removed[before:]

    def _leftover(self, entry: os.DirEntry[str]) -> bool:
        tagged = _TAGGED.match(entry.name)
        if tagged is not None and tagged.group(1) == self.mine:
            return not _life or tagged.group(2) != _life  # this life's own are in use
        if tagged is not None:
            node = tagged.group(1)
            if node not in self._verdicts:
                self._verdicts[node] = self.alive(node)
            if self._verdicts[node] is not None:
                return not self._verdicts[node]
        return entry.stat(follow_symlinks=False).st_mtime < self._stale_before


def cannot_write(folder: Path) -> str | None:
    """Why nothing can be written in ``folder`` (or, when it does not exist yet, in the nearest folder above it
    that does, where it would be made), or None when a file can be: proven by making one, not by permission bits
    (a read-only mount, an ACL, a full disk all show)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".watcher-probe-"):
            return None
    except OSError as exc:
        return f"{exc.strerror or exc} ({probe})"


def raise_open_files_limit(ceiling: int = 1 << 16) -> int:
    """Raise this process's soft limit of open files to its hard limit (at most ``ceiling``), as a daemon that
    holds folders, sockets and files at once needs: systemd's default soft limit is 1024. Returns the soft
    limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return ceiling if soft == resource.RLIM_INFINITY else soft
    with contextlib.suppress(ValueError, OSError):  # macOS refuses above its own OPEN_MAX
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    return soft
