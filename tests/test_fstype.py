"""Network filesystems are found and polled; local ones use native events."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from watcher.detect.fstype import (
    decide_polling,
    filesystem_type,
    inotify_max_user_watches,
    is_network_fs,
    mounts_linux,
    parse_mount_output,
)

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /mnt/nas rw,relatime shared:2 - nfs4 nas:/export rw,vers=4.2
31 22 0:41 / /mnt/studio\\040share rw,relatime shared:3 - cifs //server/studio rw
32 31 0:42 / /mnt/studio\\040share/local rw - ext4 /dev/sdb1 rw
33 22 0:43 / /media/cloud rw - fuse.rclone remote: rw
34 22 0:44 / /srv/archive rw,relatime shared:4 - autofs systemd-1 rw,fd=50
35 34 0:45 / /srv/archive rw,relatime shared:5 - nfs4 nas:/archive rw
36 22 0:46 / /srv/tab\\011and\\134slash rw - xfs /dev/sdc1 rw
37 22 0:47 / /srv/caf\xc3\xa9 rw - btrfs /dev/sdd1 rw
"""

MACOS_MOUNT = """\
/dev/disk3s1s1 on / (apfs, sealed, local, read-only, journaled)
devfs on /dev (devfs, local, nobrowse)
/dev/disk3s5 on /System/Volumes/Data (apfs, local, journaled, nobrowse, protect, root data)
map auto_home on /System/Volumes/Data/home (autofs, automounted, nobrowse)
//studio@nas._smb._tcp.local/Audio on /Volumes/Audio Inbox (smbfs, nodev, nosuid, mounted by studio)
afp_3x on /Volumes/Old Share (afpfs, nodev, nosuid, mounted by studio)
nas:/export on /Volumes/nfs (nfs, asynchronous)
"""


@pytest.fixture
def mounts(tmp_path: Path) -> list[tuple[str, str]]:
    """The sample mount table, read back from a real file as the parser reads /proc/self/mountinfo."""
    path = tmp_path / "mountinfo"
    path.write_bytes(MOUNTINFO.encode("latin-1"))
    return mounts_linux(path)


def test_mountinfo_is_parsed_with_escapes(mounts):
    """Escaped spaces, tabs and backslashes, and UTF-8 names, are read back as the mount points are named."""
    assert ("/", "ext4") in mounts
    assert ("/mnt/studio share", "cifs") in mounts
    assert ("/srv/tab\tand\\slash", "xfs") in mounts
    assert ("/srv/café", "btrfs") in mounts
    assert len(mounts) == 9


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/mnt/nas/inbox", "nfs4"),
        ("/mnt/nas", "nfs4"),
        ("/mnt/studio share/in", "cifs"),
        ("/mnt/studio share/local/x", "ext4"),
        ("/media/cloud/a", "fuse.rclone"),
        ("/srv/archive/2024", "nfs4"),
        ("/srv/café/x.wav", "btrfs"),
        ("/home/me", "ext4"),
        ("/mnt/nasty", "ext4"),
    ],
)
def test_longest_mount_point_wins(mounts, path, fstype):
    """A folder belongs to the deepest mount above it (the later of two on one point), not to a sibling."""
    assert filesystem_type(path, mounts) == fstype


def test_macos_mount_output_is_parsed():
    """macOS `mount` lines give their mount points, spaces included, and the share types are network."""
    mounts = parse_mount_output(MACOS_MOUNT)
    assert ("/Volumes/Audio Inbox", "smbfs") in mounts and ("/Volumes/Old Share", "afpfs") in mounts
    assert filesystem_type("/Volumes/Audio Inbox/new", mounts) == "smbfs"
    assert filesystem_type("/Volumes/nfs/a", mounts) == "nfs"
    assert filesystem_type("/System/Volumes/Data/Users/me", mounts) == "apfs"


@pytest.mark.parametrize(
    ("fstype", "network"),
    [
        ("nfs", True),
        ("nfs4", True),
        ("cifs", True),
        ("smb3", True),
        ("smbfs", True),
        ("afpfs", True),
        ("fuse.sshfs", True),
        ("fuse.gvfsd-fuse", True),
        ("fuseblk", True),
        ("sshfs", True),
        ("9p", True),
        ("davfs", True),
        ("ceph", True),
        ("glusterfs", True),
        ("autofs", True),
        ("macfuse", True),
        ("NFS", True),
        ("ext4", False),
        ("xfs", False),
        ("btrfs", False),
        ("zfs", False),
        ("apfs", False),
        ("tmpfs", False),
        ("overlay", False),
        (None, False),
        ("", False),
    ],
)
def test_network_filesystems(fstype, network):
    """Shares, cluster filesystems and all of FUSE are network; disks, tmpfs and overlays are local."""
    assert is_network_fs(fstype) is network


@pytest.mark.parametrize(
    ("poll", "fstype", "polled", "said"),
    [
        ("auto", "nfs4", True, "nfs4 is a network filesystem"),
        ("auto", "cifs", True, "cifs is a network filesystem"),
        ("auto", "smbfs", True, "smbfs is a network filesystem"),
        ("auto", "afpfs", True, "afpfs is a network filesystem"),
        ("auto", "fuse.sshfs", True, "fuse.sshfs is a FUSE filesystem, treated as network"),
        ("auto", "ext4", False, "ext4 is a local filesystem"),
        ("auto", "apfs", False, "apfs is a local filesystem"),
        ("auto", None, False, "unknown"),
        (True, "ext4", True, "poll = true"),
        (False, "nfs", False, "poll = false"),
    ],
)
def test_polling_decision(poll, fstype, polled, said):
    """auto polls network and FUSE filesystems; an explicit setting always wins; the reason says why."""
    decided, reason = decide_polling(poll, fstype)
    assert decided is polled
    assert said in reason


def test_this_machine_root_is_known(tmp_path):
    """The real mount table gives the root's type and a temp folder's, and neither is a network one here."""
    root = filesystem_type("/")
    assert root is not None and not is_network_fs(root)
    here = filesystem_type(tmp_path)
    assert here is not None and not is_network_fs(here)


def test_a_missing_path_still_gets_its_mount(mounts):
    """A folder that does not exist yet (a share not mounted) is judged by the mount above it."""
    assert filesystem_type("/mnt/nas/not/there/yet", mounts) == "nfs4"


def test_inotify_watch_limit(tmp_path):
    """The limit is read as a number; a missing or garbled file (no /proc/sys under systemd) gives None."""
    good = tmp_path / "max_user_watches"
    good.write_text("524288\n")
    assert inotify_max_user_watches(good) == 524288
    (tmp_path / "bad").write_text("lots")
    assert inotify_max_user_watches(tmp_path / "bad") is None
    assert inotify_max_user_watches(tmp_path / "absent") is None
    if os.path.exists("/proc/sys/fs/inotify/max_user_watches"):
        limit = inotify_max_user_watches()
        assert limit is not None and limit > 0
