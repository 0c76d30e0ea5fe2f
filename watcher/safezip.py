"""Extracting a zip that came from the network, safely.

Only regular files under the destination: absolute paths, drive letters, ``..``, control characters,
links, device entries, encrypted entries and duplicate names are refused; the entry count and the total
uncompressed size are capped (declared sizes are checked first, and real bytes are counted while
extracting, since headers can lie); every entry is read whole so its CRC is checked. Extraction goes into
a new ``.watcher-tmp-`` folder inside ``dest_parent``; on any problem that folder is removed and
:class:`BadArchive` names the zip and the entry. A full disk is RetryLater instead: the zip is not at fault.

Sizes are also bounded by what the source can justify (:class:`SizeBound`, from its duration and channels):
each entry's declared size against the per-file bound, their sum against the total, and each entry's
compression ratio; while extracting, real bytes are counted against the same bounds.

A zip that is cut short is BadArchive too: the client already turns a short download (Content-Length
not met, dropped connection) into RetryLater, so a zip that arrived whole but unreadable is what the
service sent, and fetching the same bytes again would not help.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from watcher.errors import BadInput, RetryLater
from watcher.fsutil import temp_prefix
from watcher.names import display

CHUNK = 1 << 20
# OS errors that mean "this disk", not "this zip".
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}
WINDOWS_REPARSE_POINT = 0x400  # a link, in the DOS attribute bits
MAX_RATE = 192_000  # Hz: the highest sample rate a delivered version can plausibly have
MAX_SAMPLE_BYTES = 4  # 32-bit samples
MARGIN = 1.5
FLOOR = 1 << 20  # headers, metadata and very short clips
UNKNOWN_CHANNELS = 8
RATIO_MIN_BYTES = 4 << 20  # the compression ratio is checked on entries larger than this
MAX_RATIO = 1000  # audio never compresses like this; a run of zeros (a zip bomb) does
# What zipfile raises for an archive it cannot read: corrupt, truncated, or (NotImplementedError) an entry in a
# compression method it does not support, such as Deflate64. Each refuses the archive, never the daemon.
_UNREADABLE = (ValueError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError)


class BadArchive(BadInput):
    """The zip is unsafe or damaged; nothing of it was kept."""

    kind = "bad_archive"


class TooLarge(BadInput):
    """A download is larger than its source can justify; nothing of it was kept."""

    kind = "bad_archive"


@dataclass(frozen=True)
class SizeBound:
    """How many bytes one delivered file and a whole delivery may hold, and why (for error messages).

    ``duration`` is None when the source's duration is unknown and the bound is the configured cap.
    """

    per_file: int
    total: int
    duration: float | None = None
    channels: int | None = None

    def describe(self, *, total: bool = False) -> str:
        """The bound in words: ``6912000-byte bound for one file of a 3.0 s, 2-channel source``."""
        limit = self.total if total else self.per_file
        what = "the whole delivery" if total else "one file"
        if self.duration is None:
            return f"{limit}-byte limit for {what} (max_archive_bytes; the source's duration is unknown)"
        ch = f"{self.channels}-channel" if self.channels else "unknown channel count"
        return f"{limit}-byte bound for {what} of a {self.duration:.1f} s, {ch} source"


def size_bound(duration: float | None, channels: int | None, files: int, cap: int) -> SizeBound:
    """The bound a source of ``duration`` seconds and ``channels`` justifies for ``files`` delivered files.

    Per file: 192 kHz x 4 bytes x channels x duration x 1.5, plus 1 MiB; total: that x ``files`` plus 1 MiB
    (an info file), never above ``cap``. Output may be stereo from a mono source, so at least 2 channels are
    assumed; unknown channels count as 8. Unknown duration: ``cap`` for both.
    """
    if duration is None or duration < 0:
        return SizeBound(cap, cap)
    ch = max(2, channels) if channels else UNKNOWN_CHANNELS
    per_file = int(MAX_RATE * MAX_SAMPLE_BYTES * ch * duration * MARGIN) + FLOOR
    per_file = min(per_file, cap)
    return SizeBound(per_file, min(per_file * max(1, files) + FLOOR, cap), duration, channels)


@dataclass(frozen=True)
class ExtractedFile:
    """One extracted regular file: its path relative to the root (POSIX separators), size and sha256."""

    path: str
    size: int
    sha256: str


@dataclass
class ExtractedArchive:
    """Where the entries went (a temp folder the caller moves into place) and what they are."""

    root: Path
    files: list[ExtractedFile] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _safe_name(name: str) -> PurePosixPath:
    """The entry's relative path, or ValueError saying why it cannot be written."""
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise ValueError("a control character in its name")
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ValueError("absolute path")
    path = PurePosixPath(name)
    if any(part == ".." for part in path.parts):
        raise ValueError("'..' in its path")
    if not path.parts or any(part in ("", ".") for part in path.parts):
        raise ValueError("empty path")
    return path


def _kind(info: zipfile.ZipInfo) -> str:
    """``file``, ``dir``, or what else the entry's mode bits say it is (a link, a special file)."""
    mode = info.external_attr >> 16
    if info.external_attr & WINDOWS_REPARSE_POINT:
        return "link"
    if stat.S_IFMT(mode) == 0:  # no type bits at all: a plain entry from a simple zipper
        return "dir" if info.is_dir() else "file"
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) and not info.is_dir() else "special file"


def _check_all(
    infos: list[zipfile.ZipInfo], max_total_bytes: int, max_entries: int, bound: SizeBound | None
) -> tuple[str, str] | None:
    """The first (entry, reason) that refuses the whole zip before anything is written, or None."""
    if len(infos) > max_entries:
        return "(all)", f"{len(infos)} entries, more than the limit of {max_entries}"
    declared = sum(i.file_size for i in infos)
    if declared > max_total_bytes:
        return "(all)", f"{declared} bytes uncompressed, more than the limit of {max_total_bytes}"
    for info in infos:
        if bound is not None and info.file_size > bound.per_file:
            return info.filename, f"{info.file_size} bytes uncompressed, more than the limit ({bound.describe()})"
        ratio = info.file_size / max(1, info.compress_size)
        if info.file_size > RATIO_MIN_BYTES and ratio > MAX_RATIO:
            return info.filename, (
                f"compressed {ratio:.0f}:1 ({info.compress_size} bytes to {info.file_size}), more than the limit "
                f"of {MAX_RATIO}:1, which audio never reaches"
            )
    if bound is not None and declared > bound.total:
        return "(all)", f"{declared} bytes uncompressed in all, more than the limit ({bound.describe(total=True)})"
    seen: dict[str, str] = {}
    for info in infos:
        try:
            rel = _safe_name(info.filename)
        except ValueError as exc:
            return info.filename, str(exc)
        kind = _kind(info)
        if kind not in ("file", "dir"):
            return info.filename, f"a {kind}"
        if info.flag_bits & 0x1:
            return info.filename, "encrypted"
        # Case-folded: the output may sit on a case-insensitive disk (macOS, SMB shares).
        key = rel.as_posix().casefold()
        if key in seen and not (kind == "dir" and seen[key] == "dir"):
            return info.filename, "a duplicate name"
        seen[key] = kind
    for key in seen:
        parents = PurePosixPath(key).parents
        clash = next((p for p in parents if seen.get(p.as_posix()) == "file"), None)
        if clash is not None:
            return key, f"inside {clash.as_posix()!r}, which is a file"
    return None


@dataclass
class _Counter:
    """Bytes written so far, against the per-file and total limits (the headers' sizes are not trusted)."""

    per_file: int
    total_limit: int
    bound: SizeBound | None
    written: int = 0

    def add(self, size: int, chunk: int) -> None:
        """Count ``chunk`` more bytes of an entry now ``size`` long; ValueError past a limit."""
        self.written += chunk
        if size > self.per_file:
            over = f"({self.bound.describe()})" if self.bound else f"of {self.per_file} bytes"
            raise ValueError(f"more than the limit {over} (headers understated)")
        if self.written > self.total_limit:
            over = f"({self.bound.describe(total=True)})" if self.bound else f"of {self.total_limit} bytes"
            raise ValueError(f"more than the limit {over} in all (headers understated)")


def _extract_one(zf: zipfile.ZipFile, info: zipfile.ZipInfo, root: Path, counter: _Counter) -> ExtractedFile | None:
    """Write one entry under ``root`` (private until delivered), counting and hashing its bytes."""
    rel = _safe_name(info.filename)
    target = root.joinpath(*rel.parts)
    if not target.is_relative_to(root):  # belt and braces after _safe_name
        raise ValueError("outside the destination")
    if _kind(info) == "dir":
        target.mkdir(parents=True, exist_ok=True)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256()
    size = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    with zf.open(info) as src, os.fdopen(fd, "wb") as out:
        while chunk := src.read(CHUNK):
            size += len(chunk)
            counter.add(size, len(chunk))
            sha.update(chunk)
            out.write(chunk)
    return ExtractedFile(rel.as_posix(), size, sha.hexdigest())


def extract_zip(
    zip_path: Path, dest_parent: Path, *, max_total_bytes: int, max_entries: int, bound: SizeBound | None = None
) -> ExtractedArchive:
    """Extract ``zip_path`` into a new ``.watcher-tmp-*`` folder in ``dest_parent``; BadArchive on any problem.

    ``bound`` (from the source's duration) caps each entry and the total below ``max_total_bytes``.
    """
    per_file = bound.per_file if bound is not None else max_total_bytes
    total_limit = min(max_total_bytes, bound.total) if bound is not None else max_total_bytes
    dest_parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"{temp_prefix()}zip-", dir=dest_parent))
    result = ExtractedArchive(root)
    entry = "(none)"
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
            refused = _check_all(infos, max_total_bytes, max_entries, bound)
            if refused:
                entry = refused[0]
                raise ValueError(refused[1])
            counter = _Counter(per_file, total_limit, bound)
            for info in infos:
                entry = info.filename
                extracted = _extract_one(zf, info, root, counter)
                if extracted is not None:
                    result.files.append(extracted)
    except _UNREADABLE as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise BadArchive(f"refused zip {display(zip_path.name)}: entry {entry!r}: {exc}") from None
    except OSError as exc:
        shutil.rmtree(root, ignore_errors=True)
        if exc.errno in DISK_ERRNOS or entry == "(none)":
            raise RetryLater(
                f"could not extract zip {display(zip_path.name)} into {display(dest_parent)}: {exc.strerror}"
            ) from exc
        raise BadArchive(f"refused zip {display(zip_path.name)}: entry {entry!r}: {exc.strerror}") from None
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return result
