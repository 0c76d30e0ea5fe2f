"""Polling by directory mtimes on a real folder: what each poll finds, and which directories it lists."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import wait_for
from watcher.detect.poll import DirPoller

pytestmark = pytest.mark.timeout(30)
HOUR_AGO = time.time() - 3600


class Recorder:
    """The hints a poller gives, and the directories it lists (through the injected scandir)."""

    def __init__(self) -> None:
        self.hints: list[tuple[str, bool]] = []
        self.listed: list[str] = []

    def hint(self, path: str, *, is_dir: bool, closed: bool) -> None:
        self.hints.append((path, is_dir))

    def scandir(self, path: str):
        self.listed.append(path)
        return os.scandir(path)

    def take(self) -> tuple[list[tuple[str, bool]], list[str]]:
        hints, listed = sorted(self.hints), sorted(self.listed)
        self.hints.clear()
        self.listed.clear()
        return hints, listed


def age(root: Path) -> None:
    """Set every directory's mtime an hour back: what a folder that has been quiet for a while looks like."""
    for folder, _, _ in os.walk(root):
        os.utime(folder, (HOUR_AGO, HOUR_AGO))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    for rel in ("top.wav", "a/one.wav", "a/b/two.wav", "c/three.wav"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"RIFF")
    age(root)
    return root


def poller(root: Path, rec: Recorder, *, recursive: bool = True) -> DirPoller:
    p = DirPoller(str(root), recursive=recursive, hint=rec.hint, interval=60, rescan_interval=3600, scandir=rec.scandir)
    p.snapshot()
    rec.take()
    return p


def test_a_quiet_tree_is_not_listed(tree):
    """Nothing changed: a poll stats the directories and lists none of them, and hints nothing."""
    rec = Recorder()
    p = poller(tree, rec)
    assert sorted(p.dirs) == sorted(str(tree / d) for d in ("", "a", "a/b", "c"))
    p.poll()
    assert rec.take() == ([], [])


def test_a_file_made_while_its_folder_is_listed_by_the_first_snapshot_is_hinted(tree):
    """A file created between the folder's stat and its listing: listed by the snapshot, and still hinted (once
    the folder's mtime is read after the listing), rather than held in the snapshot unhinted for good."""
    rec = Recorder()
    raced = tree / "c" / "raced.wav"

    def scandir(path: str):
        if path == str(tree / "c") and not raced.exists():
            raced.write_bytes(b"RIFF")  # the copy lands just as the folder is being listed
        return rec.scandir(path)

    p = DirPoller(str(tree), recursive=True, hint=rec.hint, interval=60, rescan_interval=3600, scandir=scandir)
    p.snapshot(hint_since=time.time())
    p.poll()
    assert (str(raced), False) in rec.take()[0]


def test_files_arriving_while_the_first_snapshot_is_taken_are_hinted(tree):
    """The first snapshot runs beside the start-up scan: files of a folder changed since the poller started are
    hinted (the scan may have listed that folder before they came); quiet folders' files are not."""
    rec = Recorder()
    started = time.time()
    (tree / "a" / "b" / "during.wav").write_bytes(b"RIFF")
    p = DirPoller(str(tree), recursive=True, hint=rec.hint, interval=60, rescan_interval=3600, scandir=rec.scandir)
    p.snapshot(hint_since=started)
    hints, listed = rec.take()
    assert hints == [(str(tree / "a/b/during.wav"), False), (str(tree / "a/b/two.wav"), False)]
    assert len(listed) == 4


def test_a_new_file_in_a_nested_folder_is_found_by_listing_only_its_folder(tree):
    """A file created two levels down is hinted; only its folder (whose mtime changed) is listed."""
    rec = Recorder()
    p = poller(tree, rec)
    (tree / "a" / "b" / "new.wav").write_bytes(b"RIFF....")
    p.poll()
    assert rec.take() == ([(str(tree / "a/b/new.wav"), False)], [str(tree / "a/b")])
    # just listed, in the same mtime tick as the change: listed once more, in case a second change hid in it
    (tree / "a" / "b" / "new2.wav").write_bytes(b"RIFF")
    p.poll()
    assert rec.take() == ([(str(tree / "a/b/new2.wav"), False)], [str(tree / "a/b")])
    age(tree)
    p.poll()
    assert rec.take() == ([], [str(tree / "a/b")])  # mtime changed (aged): listed, nothing new
    p.poll()
    assert rec.take() == ([], [])


def test_a_renamed_file_is_found_under_its_new_name(tree):
    """A rename inside a folder (a copy tool's temp name to the final one) hints the new name only."""
    rec = Recorder()
    p = poller(tree, rec)
    os.rename(tree / "c" / "three.wav", tree / "c" / "renamed.wav")
    p.poll()
    assert rec.take() == ([(str(tree / "c/renamed.wav"), False)], [str(tree / "c")])
    assert set(p.dirs[str(tree / "c")].entries) == {"renamed.wav"}


def test_a_removed_file_is_forgotten_and_found_again_when_it_returns(tree):
    """A deletion is not hinted (as with native events) but forgotten: the same name coming back is new."""
    rec = Recorder()
    p = poller(tree, rec)
    (tree / "a" / "one.wav").unlink()
    p.poll()
    assert rec.take() == ([], [str(tree / "a")])
    assert "one.wav" not in p.dirs[str(tree / "a")].entries
    (tree / "a" / "one.wav").write_bytes(b"RIFF")
    p.poll()
    assert rec.take()[0] == [(str(tree / "a/one.wav"), False)]


def test_a_removed_folder_is_forgotten_with_everything_under_it(tree):
    """Deleting a sub-tree drops its directories from the snapshot; later polls do not look for them."""
    rec = Recorder()
    p = poller(tree, rec)
    for path in (tree / "a" / "b" / "two.wav", tree / "a" / "one.wav"):
        path.unlink()
    (tree / "a" / "b").rmdir()
    (tree / "a").rmdir()
    p.poll()
    assert sorted(p.dirs) == sorted(str(tree / d) for d in ("", "c"))
    assert rec.take() == ([], [str(tree)])


def test_the_folder_itself_going_and_coming_back_is_scanned_again(tree, tmp_path):
    """The watched folder moved away is forgotten; when a folder is back at its path, it is hinted whole."""
    rec = Recorder()
    p = poller(tree, rec)
    os.rename(tree, tmp_path / "away")
    p.poll()
    assert p.dirs == {} and rec.take()[0] == []
    p.poll()
    assert rec.take() == ([], [])
    (tmp_path / "away" / "a" / "later.wav").write_bytes(b"RIFF")
    os.rename(tmp_path / "away", tree)
    p.poll()
    assert rec.take()[0] == [(str(tree), True)]
    assert str(tree / "a/b") in p.dirs


def test_a_folder_moved_in_is_hinted_as_a_folder_and_watched(tree, tmp_path):
    """A directory that appears is hinted as one (the detector scans it) and its files are polled from then on."""
    album = tmp_path / "album"
    (album / "cd1").mkdir(parents=True)
    (album / "cd1" / "t1.wav").write_bytes(b"RIFF")
    age(album)
    rec = Recorder()
    p = poller(tree, rec)
    os.rename(album, tree / "album")
    p.poll()
    hints, listed = rec.take()
    assert hints == [(str(tree / "album"), True)]
    assert listed == sorted([str(tree), str(tree / "album"), str(tree / "album/cd1")])
    (tree / "album" / "cd1" / "t2.wav").write_bytes(b"RIFF")
    p.poll()
    assert (str(tree / "album/cd1/t2.wav"), False) in rec.take()[0]


def test_an_in_place_rewrite_is_found_only_by_the_full_rescan(tree):
    """Rewriting an existing file keeps its folder's mtime: ordinary polls miss it, the full listing finds it."""
    rec = Recorder()
    now = [time.time()]
    p = DirPoller(
        str(tree), recursive=True, hint=rec.hint, interval=60, rescan_interval=600, scandir=rec.scandir,
        clock=lambda: now[0],
    )  # fmt: skip
    p.snapshot()
    rec.take()
    with (tree / "a" / "b" / "two.wav").open("r+b") as fh:
        fh.write(b"RIFX and more bytes")
    os.utime(tree / "a" / "b" / "two.wav", (HOUR_AGO + 60, HOUR_AGO + 60))  # a copy that keeps the source's mtime
    p.poll()
    assert rec.take() == ([], [])
    now[0] += 601  # the full rescan is due
    p.poll()
    hints, listed = rec.take()
    assert hints == [(str(tree / "a/b/two.wav"), False)]
    assert len(listed) == 4  # every directory
    p.poll()
    assert rec.take() == ([], [])


def test_not_recursive_polls_only_the_top_folder(tree):
    """recursive = false: sub-folders are neither listed nor hinted."""
    rec = Recorder()
    p = poller(tree, rec, recursive=False)
    assert list(p.dirs) == [str(tree)]
    (tree / "a" / "deeper.wav").write_bytes(b"RIFF")
    (tree / "new dir").mkdir()
    (tree / "late.wav").write_bytes(b"RIFF")
    p.poll()
    assert rec.take() == ([(str(tree / "late.wav"), False)], [str(tree)])


def test_the_thread_polls_until_stopped(tree):
    """Started, the poller finds a new file by itself; stopped, its thread ends."""
    rec = Recorder()
    p = DirPoller(str(tree), recursive=True, hint=rec.hint, interval=0.05, rescan_interval=3600)
    p.start()
    try:
        (tree / "c" / "arrived.wav").write_bytes(b"RIFF")
        wait_for(lambda: (str(tree / "c/arrived.wav"), False) in rec.hints, what="the new file hinted")
    finally:
        p.stop()
        p.join(5)
    assert not p.is_alive()
