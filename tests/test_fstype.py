"""Network filesystems are found and polled; local ones use native events."""

from __future__ import annotations

from pathlib import Path

import pytest

from watcher.detect.fstype import decide_polling, filesystem_type, is_network_fs, mounts_linux

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /mnt/nas rw,relatime shared:2 - nfs4 nas:/export rw,vers=4.2
31 22 0:41 / /mnt/studio\\040share rw,relatime shared:3 - cifs //server/studio rw
32 31 0:42 / /mnt/studio\\040share/local rw - ext4 /dev/sdb1 rw
33 22 0:43 / /media/cloud rw - fuse.rclone remote: rw
"""


@pytest.fixture
def mounts(tmp_path: Path) -> list[tuple[str, str]]:
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    return mounts_linux(path)


def test_mountinfo_is_parsed_with_escapes(mounts):
    """Mount points with escaped spaces are read back as written."""
    assert ("/mnt/studio share", "cifs") in mounts and ("/", "ext4") in mounts


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/mnt/nas/inbox", "nfs4"),
        ("/mnt/studio share/in", "cifs"),
        ("/mnt/studio share/local/x", "ext4"),
        ("/media/cloud/a", "fuse.rclone"),
        ("/home/me", "ext4"),
        ("/mnt/nasty", "ext4"),
    ],
)
def test_longest_mount_point_wins(mounts, path, fstype):
    """A folder belongs to the deepest mount above it, not to a sibling with a common prefix."""
    assert filesystem_type(path, mounts) == fstype


@pytest.mark.parametrize(
    ("poll", "fstype", "polled"),
    [
        ("auto", "nfs4", True),
        ("auto", "cifs", True),
        ("auto", "smbfs", True),
        ("auto", "afpfs", True),
        ("auto", "fuse.sshfs", True),
        ("auto", "ext4", False),
        ("auto", "apfs", False),
        ("auto", None, False),
        (True, "ext4", True),
        (False, "nfs", False),
    ],
)
def test_polling_decision(poll, fstype, polled):
    """auto polls network and FUSE filesystems; an explicit setting always wins; the reason says why."""
    decided, reason = decide_polling(poll, fstype)
    assert decided is polled
    assert reason
    if poll == "auto" and polled:
        assert fstype in reason and "network" in reason


def test_this_machine_root_is_known(tmp_path):
    """The real mount table gives a type for a temp folder, and it is not a network one here."""
    fstype = filesystem_type(tmp_path)
    assert fstype is not None and not is_network_fs(fstype)
