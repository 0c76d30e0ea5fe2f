"""Detection with real watchdog observers on real folders: what becomes work, when, and only once."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from tests.conftest import wait_for, write_tone
from watcher.audiofile import Signature
from watcher.config import FolderConfig
from watcher.detect.detector import Detector
from watcher.detect.filters import PathFilter
from watcher.detect.settle import Settler

pytestmark = pytest.mark.timeout(30)


class RecordingSink:
    """Remembers every settled file (thread-safe), like the store would."""

    def __init__(self) -> None:
        self.ready_files: list[tuple[str, Signature]] = []
        self.lock = threading.Lock()

    def known(self, path: str, sig: Signature) -> bool:
        with self.lock:
            return (path, sig) in self.ready_files

    def ready(self, folder: FolderConfig, path: str, rel_path: str, sig: Signature) -> None:
        with self.lock:
            self.ready_files.append((path, sig))

    def names(self) -> list[str]:
        with self.lock:
            return [Path(p).name for p, _ in self.ready_files]


class RunningDetector:
    def __init__(self, folder: FolderConfig, sink: RecordingSink) -> None:
        self.detector = Detector([folder], sink, health_every=0.2)
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        assert self.started.wait(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.stop_event = asyncio.Event()
            await self.detector.run(self.stop_event, on_first_scan=self.started.set)

        self.loop.run_until_complete(main())
        self.loop.close()

    def stop(self) -> None:
        assert self.stop_event is not None
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(10)


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[Callable[..., tuple[RunningDetector, RecordingSink]]]:
    running: list[RunningDetector] = []

    def start(folder: Path, **options) -> tuple[RunningDetector, RecordingSink]:
        options.setdefault("settle_seconds", 0.5)
        sink = RecordingSink()
        d = RunningDetector(FolderConfig(path=folder, **options), sink)
        running.append(d)
        return d, sink

    yield start
    for d in running:
        d.stop()


def test_existing_files_are_found_at_start(tmp_path, watch):
    """Files present before the observer starts are picked up by the start-up scan (watchdog sends nothing)."""
    write_tone(tmp_path / "in" / "old.wav", 0.1)
    write_tone(tmp_path / "in" / "sub" / "deeper.flac", 0.1)  # content is WAV; detection only filters names
    _, sink = watch(tmp_path / "in")
    wait_for(lambda: len(sink.names()) == 2)
    assert sorted(sink.names()) == ["deeper.flac", "old.wav"]


def test_rename_into_place(tmp_path, watch):
    """A file written under a temp name and renamed is work once, under its final name."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    _, sink = watch(inbox)
    write_tone(inbox / "take.wav.part", 0.5)
    os.rename(inbox / "take.wav.part", inbox / "take.wav")
    wait_for(lambda: sink.names() == ["take.wav"])


def test_rsync_temp_name_is_ignored_until_renamed(tmp_path, watch):
    """rsync's `.name.XXXXXX` temp file is never work; the renamed file is."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    _, sink = watch(inbox)
    tmp = write_tone(inbox / ".song.wav.Gx81Qa", 0.5)
    marker = write_tone(inbox / "marker.wav", 0.05)
    wait_for(lambda: "marker.wav" in sink.names())
    assert ".song.wav.Gx81Qa" not in sink.names()
    os.rename(tmp, inbox / "song.wav")
    wait_for(lambda: "song.wav" in sink.names())
    assert sorted(sink.names()) == ["marker.wav", "song.wav"]
    assert marker.exists()


def test_moved_in_folder_is_scanned(tmp_path, watch):
    """A whole folder moved into the watched folder brings its files with it."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    album = tmp_path / "album"
    write_tone(album / "01.wav", 0.1)
    write_tone(album / "cd2" / "02.wav", 0.1)
    _, sink = watch(inbox)
    shutil.move(album, inbox / "album")
    wait_for(lambda: sorted(sink.names()) == ["01.wav", "02.wav"])


def test_deleted_before_settling_is_not_work(tmp_path, watch):
    """A file removed before its settle window ended never reaches the sink, and that is logged."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    d, sink = watch(inbox, settle_seconds=1.0)
    with structlog.testing.capture_logs() as logs:
        doomed = write_tone(inbox / "doomed.wav", 0.1)
        wait_for(lambda: str(doomed) in d.detector.settler.candidates)
        doomed.unlink()
        write_tone(inbox / "kept.wav", 0.1)
        wait_for(lambda: sink.names() == ["kept.wav"], what="kept.wav settled")
    assert any(e["event"] == "detect.vanished" and e["path"] == str(doomed) for e in logs)


def test_unicode_and_spaces_in_names(tmp_path, watch):
    """Names in any script, with spaces, are handled like any other."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    _, sink = watch(inbox)
    names = ["Björk – Jóga (live).wav", "日本語のトラック.mp3", "  spaced  .wav"]
    for n in names:
        write_tone(inbox / n, 0.05)
    wait_for(lambda: sorted(sink.names()) == sorted(names))


def test_zero_byte_file_is_reported_as_a_version(tmp_path, watch):
    """An empty file settles like any other (the stage decides to skip it); when written later, it is a new version."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    _, sink = watch(inbox)
    empty = inbox / "empty.wav"
    empty.write_bytes(b"")
    wait_for(lambda: sink.names() == ["empty.wav"])
    write_tone(empty, 0.1)
    wait_for(lambda: sink.names() == ["empty.wav", "empty.wav"])
    assert sink.ready_files[0][1].size == 0 and sink.ready_files[1][1].size > 0


def test_polling_observer_sees_new_files(tmp_path, watch):
    """With poll = true (network shares) new files are still found."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    d, sink = watch(inbox, poll=True, poll_interval=0.2)
    assert d.detector.describe()[0]["mode"] == "polling"
    write_tone(inbox / "share.wav", 0.1)
    wait_for(lambda: sink.names() == ["share.wav"])


def test_non_recursive_folder_ignores_subfolders(tmp_path, watch):
    """recursive = false: only the folder's own files are work."""
    inbox = tmp_path / "in"
    write_tone(inbox / "top.wav", 0.05)
    write_tone(inbox / "sub" / "nested.wav", 0.05)
    _, sink = watch(inbox, recursive=False)
    wait_for(lambda: sink.names() == ["top.wav"])
    write_tone(inbox / "sub" / "later.wav", 0.05)
    write_tone(inbox / "top2.wav", 0.05)
    wait_for(lambda: sorted(sink.names()) == ["top.wav", "top2.wav"])


def test_vanished_folder_is_paused_and_resumed(tmp_path, watch):
    """A folder that disappears (unmounted share) is reported unavailable, and scanned again when it returns."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    d, sink = watch(inbox)
    hidden = tmp_path / "unmounted"
    inbox.rename(hidden)
    wait_for(lambda: d.detector.describe()[0]["available"] is False, what="folder reported unavailable")
    write_tone(hidden / "while away.wav", 0.05)
    hidden.rename(inbox)
    wait_for(lambda: sink.names() == ["while away.wav"], what="rescan after return")


@pytest.mark.parametrize(
    ("rel", "wanted"),
    [
        ("a.wav", True),
        ("A.WAV", True),
        ("x/y/b.flac", True),
        ("notes.txt", False),
        ("a.wav.part", False),
        ("._a.wav", False),
        (".DS_Store", False),
        ("~$session.wav", False),
        ("@eaDir/a.wav", False),
        (".a.wav.Xy12Ab", False),
        ("a.wav.analysis.json", False),
        (".watcher-tmp-123/a.wav", False),
    ],
)
def test_default_filter(rel, wanted):
    """Audio extensions are work; temp and OS files, our sidecars and temp folders are not."""
    from watcher.config import AUDIO_PATTERNS

    assert PathFilter(AUDIO_PATTERNS).wants_file(rel) is wanted


def test_user_excludes_and_path_patterns():
    """A user exclude adds to the built-in list; a pattern with '/' matches the relative path."""
    f = PathFilter(["*.wav"], ["rejects", "drafts/*.wav"], extra_excluded_dirs=["out"])
    assert not f.wants_file("rejects/a.wav")
    assert not f.wants_file("drafts/a.wav")
    assert f.wants_file("final/a.wav")
    assert not f.wants_file("out/x/a.wav") and not f.wants_dir("out")


def test_settler_needs_a_full_quiet_window(tmp_path):
    """A file is ready only after its signature stayed the same for the whole settle window."""
    now = [0.0]
    path = write_tone(tmp_path / "a.wav", 0.05)
    s = Settler(lambda: now[0])
    s.hint(str(path), 2.0)
    assert [v.outcome for v in s.check()] == ["waiting"]
    now[0] = 1.5
    assert [v.outcome for v in s.check()] == ["waiting"]
    with path.open("ab") as fh:
        fh.write(b"\0\0")
    now[0] = 2.5
    assert [v.outcome for v in s.check()] == ["waiting"]  # changed: the window starts again
    now[0] = 4.0
    assert [v.outcome for v in s.check()] == ["waiting"]
    now[0] = 4.6
    assert [v.outcome for v in s.check()] == ["ready"]
    assert not s.candidates


def test_settler_close_event_shortens_the_wait(tmp_path):
    """After a close-after-write event one quiet second is enough, never less."""
    now = [0.0]
    path = write_tone(tmp_path / "a.wav", 0.05)
    s = Settler(lambda: now[0])
    s.hint(str(path), 30.0, closed=True)
    s.check()
    now[0] = 0.9
    assert [v.outcome for v in s.check()] == ["waiting"]
    now[0] = 1.1
    assert [v.outcome for v in s.check()] == ["ready"]


def test_dead_observer_falls_back_to_polling(tmp_path, watch):
    """An observer thread that dies is noticed, replaced by polling, and files keep arriving."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    d, sink = watch(inbox)
    assert d.detector.describe()[0]["mode"] == "native"
    with structlog.testing.capture_logs() as logs:
        d.detector.folders[str(inbox)].watch.observer.stop()  # the thread ends, as after an emitter crash
        wait_for(lambda: d.detector.describe()[0]["mode"] == "polling", what="fallback to polling")
        write_tone(inbox / "after.wav", 0.05)
        wait_for(lambda: sink.names() == ["after.wav"])
    assert any(e["event"] == "watch.died" for e in logs)
    assert "polling" in d.detector.describe()[0]["reason"]


def test_exhausted_inotify_falls_back_to_polling(tmp_path, watch):
    """With every inotify instance of this user taken (a real kernel limit), the folder is polled instead."""
    import ctypes
    import errno

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "inotify_init1"):
        pytest.skip("no inotify on this system")
    taken: list[int] = []
    try:
        while len(taken) < 100_000:
            fd = libc.inotify_init1(0)
            if fd < 0:
                assert ctypes.get_errno() in (errno.EMFILE, errno.ENFILE)
                break
            taken.append(fd)
        inbox = tmp_path / "in"
        inbox.mkdir()
        with structlog.testing.capture_logs() as logs:
            d, sink = watch(inbox)
            wait_for(lambda: d.detector.describe()[0]["mode"] == "polling", what="fallback to polling")
        assert any(e["event"] in ("watch.native_failed", "watch.died") for e in logs)
    finally:
        for fd in taken:
            os.close(fd)
    write_tone(inbox / "still seen.wav", 0.05)
    wait_for(lambda: sink.names() == ["still seen.wav"])
