"""A polled folder at start: the start-up scan's walk is also the poller's first snapshot (one walk, not two).

Real folders, a real polled Detector: what the merge could break is checked, not how many walks there were.
A file or folder that arrives after the walk is still found; a symbolic link behaves as it did; the snapshot
the walk takes equals the one the poller takes itself, entry by entry.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from tests.conftest import wait_for
from tests.test_detect import RecordingSink, RunningDetector, _FussyFilter
from watcher.audiofile import Signature
from watcher.config import AUDIO_PATTERNS, FolderConfig
from watcher.detect.detector import Detector
from watcher.detect.filters import PathFilter
from watcher.detect.poll import DirPoller, Listing
from watcher.detect.scan import changed_files

pytestmark = pytest.mark.timeout(30)
TWO_HOURS_AGO = time.time() - 7200
ONE_HOUR_AGO = time.time() - 3600


def make_tree(root: Path, outside: Path) -> None:
    """Files two levels deep, an excluded folder, links to a file inside and outside, to a folder, a FIFO."""
    for rel in ("top.wav", "a/one.wav", "a/b/two.wav", "c/three.wav", "@eaDir/thumb.wav", "c/notes.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"RIFF" + rel.encode())
    outside.write_bytes(b"RIFF outside")
    os.symlink(root / "a" / "one.wav", root / "link-in.wav")
    os.symlink(outside, root / "c" / "link-out.wav")
    os.symlink(root / "a", root / "link-dir")
    os.mkfifo(root / "pipe.wav")
    for folder, _, _ in os.walk(root):
        os.utime(folder, (TWO_HOURS_AGO, TWO_HOURS_AGO))


def as_compared(dirs: dict[str, object]) -> dict[str, tuple[int, int, dict[str, tuple[bool, int, int, int]]]]:
    """A snapshot without its listing times (the walk and the poller list at different instants)."""
    return {path: (d.mtime_ns, d.inode, d.entries) for path, d in dirs.items()}  # type: ignore[attr-defined]


@pytest.mark.parametrize("recursive", [True, False], ids=["recursive", "top-only"])
def test_the_walks_snapshot_equals_the_pollers_own(tmp_path, recursive):
    """Every folder (an excluded one too, when recursive), every entry as lstat gives it (links as links, a link
    to a folder not followed): what the poller's own first snapshot holds, so its mtime shortcut works alike."""
    root = tmp_path / "in"
    make_tree(root, tmp_path / "outside.wav")
    listing = Listing(time.time)
    path_filter = PathFilter(AUDIO_PATTERNS)
    changed, seen = changed_files(str(root), path_filter, {}, recursive=recursive, listing=listing)
    poller = DirPoller(str(root), recursive=recursive, hint=lambda *a, **k: None, interval=60, rescan_interval=3600)
    poller.snapshot()
    assert as_compared(listing.dirs) == as_compared(poller.dirs)  # type: ignore[arg-type]
    expected = {"", "a", "a/b", "c", "@eaDir"} if recursive else {""}
    assert set(listing.dirs) == {str(root / d) if d else str(root) for d in expected}
    link = os.lstat(root / "link-in.wav")
    assert listing.dirs[str(root)].entries["link-in.wav"] == (False, link.st_size, link.st_mtime_ns, link.st_ino)
    # what the scan hands over is what it handed over before the walk took the snapshot too
    plain = changed_files(str(root), path_filter, {}, recursive=recursive)
    assert (sorted(changed), seen) == (sorted(plain[0]), plain[1])


def test_a_filter_failing_on_one_name_skips_that_file_only_and_the_snapshot_keeps_it(tmp_path):
    """The walk that takes the snapshot decides a regular file itself: a filter failing on its name is logged
    once and the file skipped, as the plain scan does; the poller's snapshot still holds it."""
    root = tmp_path / "in"
    make_tree(root, tmp_path / "outside.wav")
    (root / "a" / "fussy.wav").write_bytes(b"RIFF")
    listing = Listing(time.time)
    with structlog.testing.capture_logs() as logs:
        changed, _ = changed_files(str(root), _FussyFilter(AUDIO_PATTERNS), {}, listing=listing)
    assert str(root / "a" / "one.wav") in changed and str(root / "a" / "fussy.wav") not in changed
    assert [(e["event"], Path(e["path"]).name) for e in logs if e["log_level"] == "error"] == [
        ("scan.entry_failed", "fussy.wav")
    ]
    assert "fussy.wav" in listing.dirs[str(root / "a")].entries


@pytest.fixture
def polled(tmp_path: Path) -> Iterator[Callable[..., tuple[RunningDetector, RecordingSink]]]:
    """A real Detector polling one folder every 0.2 s, started in its own thread (as the daemon runs it)."""
    running: list[RunningDetector] = []

    def start(folder: Path, sink: RecordingSink | None = None) -> tuple[RunningDetector, RecordingSink]:
        sink = sink or RecordingSink()
        config = FolderConfig(path=folder, poll=True, poll_interval=0.2, settle_seconds=0.1)
        running.append(RunningDetector(config, sink))
        return running[-1], sink

    yield start
    for d in running:
        d.stop()


def poller_of(d: RunningDetector) -> DirPoller:
    watch = next(iter(d.detector.folders.values())).watch
    assert watch is not None and isinstance(watch.observer, DirPoller)
    return watch.observer


def test_files_and_folders_arriving_after_the_walk_are_found_by_the_first_polls(tmp_path, polled, monkeypatch):
    """A file written between the start's walk and the poller's first pass, into a folder whose mtime is then set
    back (but not to what the walk read), and a new folder: both found. A snapshot read after the walk (at the
    hand-over) would hold the file unhinted, and its folder's mtime would look unchanged."""
    root = tmp_path / "in"
    make_tree(root, tmp_path / "outside.wav")
    sink = RecordingSink()
    for rel in ("top.wav", "a/one.wav", "a/b/two.wav", "c/three.wav", "link-in.wav"):
        sink.ready_files.append((str(root / rel), Signature.of(os.stat(root / rel))))  # done before the restart
    adopted = threading.Event()
    walked_itself: list[str] = []
    adopt, snapshot = DirPoller.adopt, DirPoller.snapshot

    def late_adopt(self: DirPoller, listing: Listing) -> None:
        (root / "a" / "b" / "late.wav").write_bytes(b"RIFF late")
        os.utime(root / "a" / "b", (ONE_HOUR_AGO, ONE_HOUR_AGO))
        (root / "new").mkdir()
        (root / "new" / "inner.wav").write_bytes(b"RIFF inner")
        adopt(self, listing)
        adopted.set()

    def own_snapshot(self: DirPoller, *, hint_since: float | None = None) -> None:
        walked_itself.append(self.root)
        snapshot(self, hint_since=hint_since)

    monkeypatch.setattr(DirPoller, "adopt", late_adopt)
    monkeypatch.setattr(DirPoller, "snapshot", own_snapshot)
    d, _ = polled(root, sink)
    assert adopted.wait(10)
    wait_for(lambda: {"late.wav", "inner.wav"} <= set(sink.names()), what="the file and the folder after the walk")
    before = ["top.wav", "one.wav", "two.wav", "three.wav", "link-in.wav"]
    assert sorted(sink.names()) == sorted([*before, "late.wav", "inner.wav"])
    assert walked_itself == []  # the poller took the walk's snapshot, it did not list the tree again
    assert str(root / "new") in poller_of(d).dirs


def test_a_symlinked_file_behaves_as_before(tmp_path, polled):
    """A link to a file inside is compared by its target's stat (recorded: not handed over again), one leading
    outside is skipped with the scan's warning, a link to a folder is not followed; a new link is found by a
    poll. The poller's snapshot holds the links as links."""
    root = tmp_path / "in"
    make_tree(root, tmp_path / "outside.wav")
    sink = RecordingSink()
    for rel in ("top.wav", "a/one.wav", "a/b/two.wav", "c/three.wav", "link-in.wav"):
        sink.ready_files.append((str(root / rel), Signature.of(os.stat(root / rel))))
    with structlog.testing.capture_logs() as logs:
        d, _ = polled(root, sink)
        poller = poller_of(d)
        wait_for(lambda: poller.dirs, what="the poller's first snapshot")
        assert len(sink.names()) == 5  # nothing recorded came again, the link to a file included
        os.symlink(root / "c" / "three.wav", root / "c" / "link-new.wav")
        wait_for(lambda: "link-new.wav" in sink.names(), what="a new link, found by a poll")
        wait_for(lambda: not d.detector.settler.candidates, what="every candidate decided")
    assert sorted(sink.names()) == sorted(["top.wav", "one.wav", "two.wav", "three.wav", "link-in.wav", "link-new.wav"])
    assert [Path(e["path"]).name for e in logs if e["event"] == "scan.link_outside"] == ["link-out.wav"]
    entries = poller.dirs[str(root)].entries
    link = os.lstat(root / "link-dir")
    assert entries["link-dir"] == (False, link.st_size, link.st_mtime_ns, link.st_ino)
    assert not any(p.startswith(str(root / "link-dir")) for p in poller.dirs)


class _BrokenFilter(PathFilter):
    """A filter that fails for the whole folder (the walk ends with an error), as a bug would."""

    def file_matcher(self, folder: str) -> Callable[[str], object]:
        raise RuntimeError("cannot match in this folder")


def test_a_walk_that_fails_lets_the_poller_take_its_own_snapshot(tmp_path):
    """The start-up walk fails: the poller does not wait for it for ever, it lists the tree itself and polls."""
    root = tmp_path / "in"
    make_tree(root, tmp_path / "outside.wav")
    det = Detector([FolderConfig(path=root, poll=True, poll_interval=0.2)], RecordingSink())
    det.folders[str(root)].filter = _BrokenFilter(AUDIO_PATTERNS)

    async def main() -> set[str]:
        stop = asyncio.Event()
        started = asyncio.Event()
        task = asyncio.create_task(det.run(stop, on_first_scan=started.set))
        await asyncio.wait_for(started.wait(), 10)
        watch = det.folders[str(root)].watch
        assert watch is not None and isinstance(watch.observer, DirPoller)
        poller = watch.observer
        for _ in range(500):
            if poller.dirs:
                break
            await asyncio.sleep(0.02)  # sleep-ok: the polling step of a deadline-bounded wait
        stop.set()
        await asyncio.wait_for(task, 10)
        return set(poller.dirs)

    with structlog.testing.capture_logs() as logs:
        listed = asyncio.run(main())
    assert "scan.failed" in {e["event"] for e in logs}
    assert listed == {str(root / d) if d else str(root) for d in ("", "a", "a/b", "c", "@eaDir")}


def test_a_walk_gives_the_collector_back_as_it_found_it() -> None:
    """The collector is off while walks run (two at once: off until the last ends), back on after, even when a
    walk fails; one that was off before stays off."""
    import gc

    from watcher.detect.folders import _CollectorPause

    pause = _CollectorPause()
    assert gc.isenabled()
    with pause():
        assert not gc.isenabled()
        with pause():
            assert not gc.isenabled()
        assert not gc.isenabled(), "another walk still runs"
    assert gc.isenabled()
    with pytest.raises(OSError), pause():
        raise OSError("the share went away")
    assert gc.isenabled()
    gc.disable()
    try:
        with pause():
            pass
        assert not gc.isenabled(), "it was off before: it stays off"
    finally:
        gc.enable()


def test_what_the_first_walk_keeps_is_kept_out_of_the_collectors_passes() -> None:
    """A first walk's snapshot lives on: it is frozen (the collector's passes skip it) before the collector comes
    back; any other walk leaves the frozen set alone."""
    import gc

    from watcher.detect.folders import _CollectorPause

    pause = _CollectorPause()
    kept = [(False, n, n, n) for n in range(1000)]  # noqa: F841 (alive through the walk, as a snapshot is)
    gc.unfreeze()
    try:
        with pause():
            pass
        assert gc.get_freeze_count() == 0
        with pause(keep=True):
            assert gc.get_freeze_count() == 0
        assert gc.get_freeze_count() >= 1000 and gc.isenabled()
    finally:
        gc.unfreeze()
