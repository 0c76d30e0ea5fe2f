"""Extracting a zip that came from the network, safely.

Only regular files under the destination: absolute paths, drive letters, ``..``, links and device entries
are refused; the entry count and the total uncompressed size are capped (declared sizes are checked first,
and real bytes are counted while extracting, since headers can lie); every entry is read whole so its CRC
is checked. Extraction goes into a new temp folder inside the destination's parent; on any problem that
folder is removed and :class:`BadArchive` names the zip and the entry.
"""

from __future__ import annotations

import hashlib
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from watcher.errors import BadInput
from watcher.fsutil import TEMP_PREFIX

CHUNK = 1 << 20


class BadArchive(BadInput):
    """The zip is unsafe or damaged; nothing of it was kept."""

    kind = "bad_archive"


@dataclass(frozen=True)
class ExtractedFile:
    path: str  # relative, POSIX separators
    size: int
    sha256: str


@dataclass
class ExtractedArchive:
    """Where the entries went (a temp folder the caller moves into place) and what they are."""

    root: Path
    files: list[ExtractedFile] = field(default_factory=list)


def _safe_name(name: str) -> PurePosixPath:
    """The entry's relative path, or ValueError saying why it cannot be written."""
    if "\\" in name:
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
    mode = info.external_attr >> 16
    if info.is_dir():
        return "dir"
    if stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # no type bits at all: a plain file from a simple zipper
        return "link" if stat.S_ISLNK(mode) else "special file"
    return "file"


def extract_zip(zip_path: Path, dest_parent: Path, *, max_total_bytes: int, max_entries: int) -> ExtractedArchive:
    """Extract ``zip_path`` into a new ``.watcher-tmp-*`` folder in ``dest_parent``; BadArchive on any problem."""
    dest_parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}zip-", dir=dest_parent))
    result = ExtractedArchive(root)
    entry = "(none)"
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
            if len(infos) > max_entries:
                raise ValueError(f"{len(infos)} entries, more than the limit of {max_entries}")
            declared = sum(i.file_size for i in infos)
            if declared > max_total_bytes:
                raise ValueError(f"{declared} bytes uncompressed, more than the limit of {max_total_bytes}")
            written = 0
            for info in infos:
                entry = info.filename
                rel = _safe_name(info.filename)
                kind = _kind(info)
                if kind == "dir":
                    (root / rel).mkdir(parents=True, exist_ok=True)
                    continue
                if kind != "file":
                    raise ValueError(f"a {kind}")
                target = root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                sha = hashlib.sha256()
                size = 0
                with zf.open(info) as src, target.open("wb") as out:
                    while chunk := src.read(CHUNK):
                        size += len(chunk)
                        written += len(chunk)
                        if written > max_total_bytes:
                            raise ValueError(f"more than {max_total_bytes} bytes uncompressed (headers understated)")
                        sha.update(chunk)
                        out.write(chunk)
                result.files.append(ExtractedFile(rel.as_posix(), size, sha.hexdigest()))
    except (ValueError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise BadArchive(f"refused zip {zip_path.name}: entry {entry!r}: {exc}") from None
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return result
