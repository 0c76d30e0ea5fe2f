"""Which filesystem a folder lives on, and whether it needs polling (network shares send no events).

Linux reads ``/proc/self/mountinfo``; macOS parses ``/sbin/mount``. Every FUSE filesystem counts as
network: a FUSE type does not tell a local driver from a remote one (sshfs, rclone, gvfs SMB all look
alike), and polling a local one only costs some CPU. ``poll = false`` in a folder's config overrides it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

NETWORK_TYPES = frozenset(
    {
        # NFS, SMB/CIFS, AFP, WebDAV and friends
        "nfs",
        "nfs3",
        "nfs4",
        "cifs",
        "smb",
        "smb2",
        "smb3",
        "smbfs",
        "afpfs",
        "afs",
        "ncpfs",
        "coda",
        "davfs",
        "webdav",
        "ftp",
        "sshfs",
        # cluster and parallel filesystems
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "ocfs2",
        "gfs2",
        "orangefs",
        "pvfs2",
        # host folders shared into a VM or WSL: the host's writes send no events inside
        "9p",
        "virtiofs",
        "vboxsf",
        "vmhgfs",
        "prl_fs",
        "drvfs",
        # automounted shares (Linux autofs, macOS /net and auto_home), before or while they mount
        "autofs",
        # macOS FUSE
        "macfuse",
        "osxfuse",
        "osxfusefs",
    }
)
MOUNTINFO = Path("/proc/self/mountinfo")
MAX_USER_WATCHES = Path("/proc/sys/fs/inotify/max_user_watches")

Mounts = list[tuple[str, str]]


def _unescape(field: bytes) -> str:
    """A mountinfo field with its octal escapes (``\\040`` space, ``\\011`` tab, ``\\134`` backslash) undone."""
    raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)
    return os.fsdecode(raw)


def mounts_linux(mountinfo: Path = MOUNTINFO) -> Mounts:
    """(mount point, filesystem type) pairs from a mountinfo file, in mount order (later ones cover earlier)."""
    out = []
    for line in mountinfo.read_bytes().splitlines():
        left, sep, right = line.partition(b" - ")
        fields = left.split()
        if sep and len(fields) >= 5 and right.split():
            out.append((_unescape(fields[4]), os.fsdecode(right.split()[0])))
    return out


def parse_mount_output(text: str) -> Mounts:
    """(mount point, type) pairs from macOS/BSD ``mount`` output: ``dev on /path (type, options...)``."""
    out = []
    for line in text.splitlines():
        match = re.match(r".+? on (.+) \(([^,)]+)", line)
        if match:
            out.append((match.group(1), match.group(2).strip()))
    return out


def mounts_macos() -> Mounts:
    """The current mounts on macOS, from ``/sbin/mount``."""
    proc = subprocess.run(["/sbin/mount"], capture_output=True, text=True, timeout=10, check=False)
    return parse_mount_output(proc.stdout)


def current_mounts() -> Mounts | None:
    """This machine's mounts, or None when they cannot be read here."""
    try:
        if MOUNTINFO.exists():
            return mounts_linux()
        if sys.platform == "darwin":
            return mounts_macos()
    except (OSError, subprocess.SubprocessError):
        return None
    return None


def filesystem_type(path: str | Path, mounts: Mounts | None = None) -> str | None:
    """The type of the filesystem holding ``path`` (the longest mount point above it), or None if unknown.

    ``mounts`` defaults to this machine's; of two mounts on one point, the later (the visible one) wins.
    """
    if mounts is None:
        mounts = current_mounts()
        if mounts is None:
            return None
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for point, fstype in mounts:
        under = point == "/" or target == point or target.startswith(point.rstrip("/") + "/")
        if under and (best is None or len(point) >= best[0]):
            best = (len(point), fstype)
    return best[1] if best else None


def is_network_fs(fstype: str | None) -> bool:
    """NFS, SMB/CIFS, AFP, cluster and VM-shared filesystems, autofs and every FUSE mount count as network."""
    if not fstype:
        return False
    name = fstype.lower()
    return name in NETWORK_TYPES or name.startswith(("fuse", "nfs", "smb"))


def decide_polling(poll: bool | Literal["auto"], fstype: str | None) -> tuple[bool, str]:
    """Poll or use native events, and why in words (for the start-up log line and `watcher status`)."""
    if poll is True:
        return True, "poll = true in the configuration"
    if poll is False:
        return False, "poll = false in the configuration"
    if fstype and fstype.lower().startswith("fuse"):
        return True, f"{fstype} is a FUSE filesystem, treated as network (its changes may send no events): polled"
    if is_network_fs(fstype):
        return True, f"{fstype} is a network filesystem: changes made elsewhere send no events, so it is polled"
    if fstype is None:
        return False, "native events (the filesystem type is unknown; set poll = true for a network share)"
    return False, f"native events ({fstype} is a local filesystem)"


def inotify_max_user_watches(path: Path = MAX_USER_WATCHES) -> int | None:
    """The kernel's per-user inotify watch limit, or None where unknown (not Linux, or /proc/sys hidden)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
