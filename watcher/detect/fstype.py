"""Which filesystem a folder lives on, and whether it needs polling (network shares send no events)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

NETWORK_TYPES = {
    "nfs",
    "nfs4",
    "cifs",
    "smb",
    "smb2",
    "smb3",
    "smbfs",
    "afpfs",
    "afs",
    "9p",
    "ncpfs",
    "davfs",
    "webdav",
    "ceph",
    "glusterfs",
    "lustre",
    "gpfs",
    "beegfs",
    "ocfs2",
    "gfs2",
    "sshfs",
    "virtiofs",
}
MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_linux(mountinfo: Path = MOUNTINFO) -> list[tuple[str, str]]:
    """(mount point, filesystem type) pairs from a mountinfo file."""
    out = []
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 5 and right:
            out.append((_unescape(fields[4]), right.split()[0]))
    return out


def mounts_macos() -> list[tuple[str, str]]:
    """(mount point, type) pairs from `mount` on macOS: "dev on /path (type, options...)"."""
    text = subprocess.run(["/sbin/mount"], capture_output=True, text=True, timeout=10, check=False).stdout
    out = []
    for line in text.splitlines():
        match = re.match(r".+? on (.+) \(([^,)]+)", line)
        if match:
            out.append((match.group(1), match.group(2)))
    return out


def filesystem_type(path: str | Path, mounts: list[tuple[str, str]] | None = None) -> str | None:
    """The type of the filesystem holding ``path`` (the longest matching mount point), or None if unknown."""
    if mounts is None:
        try:
            mounts = mounts_linux() if MOUNTINFO.exists() else (mounts_macos() if sys.platform == "darwin" else [])
        except OSError:
            return None
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for point, fstype in mounts:
        under = target == point or target.startswith(point.rstrip("/") + "/") or point == "/"
        if under and (best is None or len(point) > best[0]):
            best = (len(point), fstype)
    return best[1] if best else None


def is_network_fs(fstype: str | None) -> bool:
    """NFS, SMB/CIFS, AFP, cluster filesystems and every FUSE mount count as network (events unreliable)."""
    if not fstype:
        return False
    fstype = fstype.lower()
    return fstype in NETWORK_TYPES or fstype.startswith("fuse") or fstype.startswith("nfs")


def decide_polling(poll: bool | Literal["auto"], fstype: str | None) -> tuple[bool, str]:
    """Poll or use native events, and why (for the start-up log line and `watcher status`)."""
    if poll is True:
        return True, "poll = true in the configuration"
    if poll is False:
        return False, "poll = false in the configuration"
    if is_network_fs(fstype):
        return True, f"{fstype} is a network filesystem: its changes send no events, so it is polled"
    return False, f"native events ({fstype or 'unknown filesystem'})"


def inotify_max_user_watches() -> int | None:
    """The kernel's per-user inotify watch limit (Linux), or None elsewhere."""
    try:
        return int(Path("/proc/sys/fs/inotify/max_user_watches").read_text().strip())
    except (OSError, ValueError):
        return None
