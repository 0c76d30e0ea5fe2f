"""File-system helpers: safe names from the network, umask-following outputs, crash-safe moves."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from watcher import fsutil
from watcher.fsutil import safe_component


@pytest.fixture
def real_umask_002(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process umask set to 002 for this test (and read back as watcher reads it), then restored."""
    old = os.umask(0o002)
    try:
        monkeypatch.setattr(fsutil, "UMASK", fsutil._read_umask())
        assert fsutil.UMASK == 0o002
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vocals", "vocals"),
        ("one (mastered).wav", "one (mastered).wav"),
        ("../../etc/passwd", "etc_passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("a/b/c.wav", "a_b_c.wav"),
        ("..", "stems-1"),
        (".", "stems-1"),
        ("", "stems-1"),
        ("   ", "stems-1"),
        (".hidden.wav", "hidden.wav"),
        ("--rf.wav", "rf.wav"),
        ("-", "stems-1"),
        ("x\x00y\x1b\n.wav", "x_y__.wav"),
        ("a..b.wav", "a.b.wav"),
        ("trailing. ", "trailing"),
        ("\udcff\udcfe", "stems-1"),
    ],
)
def test_safe_component(name: str, expected: str) -> None:
    """Whatever the network sends, the result is one plain, visible file name (or the fallback)."""
    got = safe_component(name, "stems-1")
    assert got == expected
    assert "/" not in got and "\\" not in got and ".." not in got and not got.startswith((".", "-"))


def test_safe_component_is_at_most_255_bytes_and_keeps_the_extension() -> None:
    """A long multibyte name is cut on a character boundary, extension kept."""
    got = safe_component("é" * 300 + ".wav", "x")
    assert len(got.encode("utf-8")) <= 255 and got.endswith(".wav") and got.startswith("é")
    got.encode("utf-8")  # valid UTF-8: no half character
    assert safe_component("", "") == ""
    assert safe_component("../", "../x") == "x"


# -- outputs follow the umask ---------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o002, 0o027])
def test_sidecars_follow_a_real_umask(tmp_path: Path, umask: int) -> None:
    """In a process started with that umask, a JSON output is 0o666 & ~umask; nothing else is left behind."""
    code = (
        "import sys; from pathlib import Path; from watcher import fsutil;"
        "fsutil.write_json_atomic(Path(sys.argv[1]), {'a': 1}); print(oct(fsutil.UMASK))"
    )
    target = tmp_path / "take.wav.analysis.json"
    out = subprocess.run(
        [sys.executable, "-c", code, str(target)], umask=umask, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == oct(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_publish_tree_gives_output_modes(tmp_path: Path, real_umask_002: None) -> None:
    """Private temp files and folders get the umask's modes when published."""
    root = tmp_path / "staging"
    (root / "stems").mkdir(parents=True, mode=0o700)
    (root / "stems" / "a.wav").write_bytes(b"x")
    os.chmod(root / "stems" / "a.wav", 0o600)
    fsutil.publish_tree(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o775
    assert stat.S_IMODE((root / "stems").stat().st_mode) == 0o775
    assert stat.S_IMODE((root / "stems" / "a.wav").stat().st_mode) == 0o664


# -- crash-safe moves ----------------------------------------------------------------------------------------


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(fsutil.TEMP_PREFIX)]


def test_move_on_one_device_renames_and_never_overwrites(tmp_path: Path) -> None:
    """A rename keeps the inode; a taken name gives ``stem.N.suffix``, the first free N."""
    done = tmp_path / "done"
    done.mkdir()
    (done / "take.wav").write_bytes(b"older")
    (done / "take.1.wav").write_bytes(b"older still")
    src = tmp_path / "take.wav"
    src.write_bytes(b"new")
    inode = src.stat().st_ino
    final = fsutil.move_file(src, done / "take.wav")
    assert final == done / "take.2.wav" and final.read_bytes() == b"new" and final.stat().st_ino == inode
    assert not src.exists() and (done / "take.wav").read_bytes() == b"older"
    assert fsutil.move_file(final, tmp_path / "new" / "x.wav") == tmp_path / "new" / "x.wav"


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for this test (another device than tmp_path); skipped where mounting is refused."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {exc}")
    try:
        assert mnt.stat().st_dev != tmp_path.stat().st_dev
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def test_move_across_devices_copies_then_removes(tmp_path: Path, small_tmpfs: Path) -> None:
    """Across devices: the bytes, mode and mtime arrive, the source goes, no temp file is left; never overwrites."""
    src = tmp_path / "take.wav"
    src.write_bytes(os.urandom(100_000))
    os.chmod(src, 0o640)
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    data = src.read_bytes()
    (small_tmpfs / "take.wav").write_bytes(b"already here")
    final = fsutil.move_file(src, small_tmpfs / "take.wav")
    assert final == small_tmpfs / "take.1.wav" and final.read_bytes() == data and not src.exists()
    assert stat.S_IMODE(final.stat().st_mode) == 0o640 and final.stat().st_mtime_ns == 1_600_000_000_000_000_000
    assert (small_tmpfs / "take.wav").read_bytes() == b"already here" and temp_files(small_tmpfs) == []


def test_move_across_devices_to_a_full_disk_leaves_the_source(tmp_path: Path, small_tmpfs: Path) -> None:
    """ENOSPC in the middle of the copy: OSError, the source untouched, nothing left at the destination."""
    src = tmp_path / "big.wav"
    src.write_bytes(os.urandom(2 << 20))  # twice the tmpfs
    before = (src.read_bytes(), src.stat().st_mtime_ns, src.stat().st_ino)
    with pytest.raises(OSError) as err:
        fsutil.move_file(src, small_tmpfs / "big.wav")
    assert err.value.errno == errno.ENOSPC
    assert (src.read_bytes(), src.stat().st_mtime_ns, src.stat().st_ino) == before
    assert list(small_tmpfs.iterdir()) == []


def test_sweep_removes_only_our_leftovers_and_follows_no_link(tmp_path):
    """`.watcher-tmp-*` files and folders go (below subfolders only where asked); anything else, and anything
    behind a link, stays."""
    from watcher.fsutil import Leftovers

    me = "0123456789abcdef"
    inbox, out, elsewhere = tmp_path / "inbox", tmp_path / "out", tmp_path / "elsewhere"
    for folder in (inbox / "album", out / f".watcher-tmp-n{me}-7-song", elsewhere):
        folder.mkdir(parents=True)
    (inbox / f".watcher-tmp-n{me}-a.json").write_text("{")
    (inbox / "album" / f".watcher-tmp-n{me}-b.json").write_text("{")
    (inbox / "take.wav").write_bytes(b"RIFF")
    (out / f".watcher-tmp-n{me}-7-song" / "x.wav").write_bytes(b"x")
    (elsewhere / f".watcher-tmp-n{me}-keep.json").write_text("{")
    (out / "link").symlink_to(elsewhere)
    removed = Leftovers(mine=me).sweep([(inbox, False), (out, True)])
    assert sorted(p.name for p in removed) == [f".watcher-tmp-n{me}-7-song", f".watcher-tmp-n{me}-a.json"]
    assert (inbox / "album" / f".watcher-tmp-n{me}-b.json").exists(), "not below a folder watched without recursion"
    assert (inbox / "take.wav").exists() and (elsewhere / f".watcher-tmp-n{me}-keep.json").exists()


def test_sweep_leaves_another_live_nodes_staging_alone(tmp_path):
    """On an output folder two nodes share, a start-up sweep removes its own leftovers and a dead node's, never a
    live node's staging folder (nor a recent one of a node the store cannot tell about)."""
    from watcher.fsutil import Leftovers

    me, live, dead, unknown = "a" * 16, "b" * 16, "c" * 16, "d" * 16
    out = tmp_path / "out"
    names = {n: out / f".watcher-tmp-n{n}-12-song" for n in (me, live, dead, unknown)}
    for folder in names.values():
        folder.mkdir(parents=True)
        (folder / "restored.wav").write_bytes(b"x")
    old = out / ".watcher-tmp-legacy.json"  # from before temp names carried a node, untouched for two days
    old.write_text("{")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    verdicts = {live: True, dead: False}
    removed = Leftovers(mine=me, alive=verdicts.get).sweep([(out, True)])
    assert sorted(removed) == sorted([names[me], names[dead], old])
    assert (names[live] / "restored.wav").exists() and (names[unknown] / "restored.wav").exists()


def test_a_sweep_spares_the_temp_files_of_its_own_life(tmp_path, monkeypatch):
    """The start-up sweep may run while this life already writes (the start-up scan sweeps a watched folder as it
    walks it): its own temp names are spared, an earlier life's of the same node (and a name from before lives
    were named) removed."""
    from watcher import fsutil

    me = "0123456789abcdef"
    monkeypatch.setattr(fsutil, "_life", "")
    fsutil.use_node(me)
    ours = tmp_path / f"{fsutil.temp_prefix()}a.json"
    assert ours.name.startswith(f".watcher-tmp-n{me}l") and len(fsutil._life) == 8
    earlier = tmp_path / f".watcher-tmp-n{me}l{'0' * 8 if fsutil._life != '0' * 8 else '1' * 8}-b.json"
    before_lives = tmp_path / f".watcher-tmp-n{me}-c.json"
    for path in (ours, earlier, before_lives):
        path.write_text("{")
    removed = fsutil.Leftovers(mine=me).sweep([(tmp_path, False)])
    assert sorted(removed) == sorted([earlier, before_lives])
    assert ours.exists()
    fsutil.use_node(me)  # a reload: the same life
    assert fsutil.temp_prefix() == ours.name[: len(fsutil.temp_prefix())]
