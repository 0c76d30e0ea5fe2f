"""Detection with real watchdog observers on real folders: what becomes work, when, and only once."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import structlog

from tests.conftest import wait_for, write_tone
from watcher.audiofile import Signature
from watcher.config import FolderConfig
from watcher.detect.detector import Detector, Settled
from watcher.detect.filters import PathFilter
from watcher.detect.poll import DirPoller
from watcher.detect.settle import CLOSE_CONFIRM_SECONDS, Finding, Settler
from watcher.names import display
from watcher.store.models import Signatures, group_by_folder

pytestmark = pytest.mark.timeout(30)


class RecordingSink:
    """Remembers every settled file (thread-safe), like the store would."""

    def __init__(self) -> None:
        self.ready_files: list[tuple[str, Signature]] = []
        self.batches: list[int] = []  # the size of each ready_many call
        self.live: dict[str, bool] = {}  # name -> whether it was handed over as live
        self.lock = threading.Lock()

    def known(self, path: str, sig: Signature) -> bool:
        with self.lock:
            return (path, sig) in self.ready_files

    async def ready(
        self, folder: FolderConfig, path: str, rel_path: str, sig: Signature, *, live: bool = False
    ) -> None:
        with self.lock:
            self.ready_files.append((path, sig))
            self.live[Path(path).name] = live

    async def ready_many(self, files: Sequence[Settled]) -> None:
        with self.lock:
            self.batches.append(len(files))
        for f in files:
            await self.ready(f.folder, f.path, f.rel_path, f.signature, live=f.live)

    def recorded(self, folder: str) -> Signatures:
        with self.lock:
            mine = [(p, s.size, s.mtime_ns, s.inode) for p, s in self.ready_files if p.startswith(folder + os.sep)]
        return group_by_folder(mine)

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


@pytest.mark.parametrize("poll", [False, True], ids=["events", "polling"])
def test_files_arriving_or_modified_recently_are_live_and_old_ones_at_start_are_backlog(tmp_path, watch, poll):
    """The start-up scan hands over a file modified within live_hours as live and an older one as backlog; a file
    or a whole folder arriving afterwards (seen by an event or a poll) is live, whatever the mtimes it brings."""
    inbox = tmp_path / "in"
    two_days_ago = time.time() - 2 * 86400
    os.utime(write_tone(inbox / "yesterday.wav", 0.1), (two_days_ago, two_days_ago))
    write_tone(inbox / "this_morning.wav", 0.1)
    album = tmp_path / "album"
    os.utime(write_tone(album / "01.wav", 0.1), (two_days_ago, two_days_ago))
    os.utime(inbox, (two_days_ago, two_days_ago))  # (a poller's first listing hints a just-changed folder's files)
    _, sink = watch(inbox, live_hours=12, poll=poll, poll_interval=0.2)
    wait_for(lambda: len(sink.names()) == 2, what="the start-up scan's files")
    write_tone(inbox / "now.wav", 0.1)
    shutil.move(album, inbox / "album")  # keeps the old mtime of 01.wav
    wait_for(lambda: len(sink.names()) == 4, what="the files that arrived")
    assert sink.live == {"yesterday.wav": False, "this_morning.wav": True, "now.wav": True, "01.wav": True}


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
    """A file removed before its settle window ended never reaches the sink, and that is logged.

    The writer still holds it open while it is removed: a closed file would be taken at once (the close rule)."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    d, sink = watch(inbox, settle_seconds=30.0)
    doomed = inbox / "doomed.wav"
    with structlog.testing.capture_logs() as logs:
        with doomed.open("wb") as writer:
            writer.write(b"RIFF" + bytes(4096))
            writer.flush()
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


def test_zero_byte_file_is_reported_as_a_revision(tmp_path, watch):
    """An empty file settles like any other (the step decides to skip it); when written later, it is a new revision."""
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


def readiness_of(findings: list[Finding]) -> list[tuple[str, str]]:
    return sorted((Path(v.candidate.path).name, v.readiness) for v in findings)


def test_settler_needs_a_full_quiet_window(tmp_path):
    """A file is ready only after its signature stayed the same for the whole settle window."""
    now = [0.0]
    path = write_tone(tmp_path / "a.wav", 0.05)
    s = Settler(lambda: now[0])
    s.hint(str(path), 2.0)
    assert s.next_deadline() == 0.0  # a new path is looked at once
    assert readiness_of(s.check()) == [("a.wav", "waiting")]
    assert s.next_deadline() == 2.0
    now[0] = 1.5
    assert s.check() == []  # not due: not looked at
    with path.open("ab") as fh:
        fh.write(b"\0\0")
    now[0] = 2.0
    assert readiness_of(s.check()) == [("a.wav", "waiting")]  # changed: the window starts again
    assert s.next_deadline() == 4.0
    now[0] = 3.9
    assert s.check() == []
    now[0] = 4.0
    assert readiness_of(s.check()) == [("a.wav", "ready")]
    assert not s.candidates and s.next_deadline() is None


def test_deadlines_fire_without_a_tick(tmp_path):
    """With an injected clock, each check stats exactly the candidates that are due, and says the next deadline;
    a write hint moves its file's deadline."""
    now = [0.0]
    stats: Counter[str] = Counter()

    def counting_stat(path: str) -> os.stat_result:
        stats[Path(path).name] += 1
        return os.stat(path)

    s = Settler(lambda: now[0], stat=counting_stat)
    for name, settle in (("a.wav", 1.0), ("b.wav", 3.0), ("c.wav", 2.0)):
        s.hint(str(write_tone(tmp_path / name, 0.05)), settle)
    assert readiness_of(s.check()) == [("a.wav", "waiting"), ("b.wav", "waiting"), ("c.wav", "waiting")]
    assert s.next_deadline() == 1.0
    now[0] = 0.5
    assert s.check() == [] and sum(stats.values()) == 3  # between deadlines nothing is looked at
    now[0] = 1.0
    assert readiness_of(s.check()) == [("a.wav", "ready")]
    assert s.next_deadline() == 2.0
    now[0] = 1.5
    s.hint(str(tmp_path / "b.wav"), 3.0)  # activity on b: its quiet period starts again
    now[0] = 2.0
    assert readiness_of(s.check()) == [("c.wav", "ready")]
    assert s.next_deadline() == 4.5
    now[0] = 3.0  # b's first deadline, moved: not looked at
    assert s.check() == [] and stats["b.wav"] == 1
    now[0] = 4.5
    assert readiness_of(s.check()) == [("b.wav", "ready")]
    assert s.next_deadline() is None
    assert stats == {"a.wav": 2, "b.wav": 2, "c.wav": 2}


def test_a_zero_window_still_needs_two_equal_stats(tmp_path):
    """settle_seconds = 0: never ready on a single stat; the second one follows at once."""
    s = Settler(lambda: 0.0)
    s.hint(str(write_tone(tmp_path / "a.wav", 0.05)), 0.0)
    assert readiness_of(s.check()) == [("a.wav", "waiting")]
    assert s.next_deadline() == 0.0
    assert readiness_of(s.check()) == [("a.wav", "ready")]


def test_a_close_matching_the_last_stat_is_taken_at_once(tmp_path):
    """A close whose stat equals the stat taken after the last write is ready at once, whatever the window."""
    now = [0.0]
    path = write_tone(tmp_path / "a.wav", 0.05)
    s = Settler(lambda: now[0])
    s.hint(str(path), 30.0)  # created
    assert readiness_of(s.check()) == [("a.wav", "waiting")]  # the last stat, after the writes
    now[0] = 0.01
    s.hint(str(path), 30.0, closed=True)
    assert s.next_deadline() == 0.01
    assert readiness_of(s.check()) == [("a.wav", "ready")]


def test_a_close_after_unstated_writes_is_confirmed_by_a_second_stat(tmp_path):
    """The close is the first thing seen, or follows write hints no stat followed: the stat at the close
    becomes the last stat, and a second equal one shortly after makes the file ready."""
    now = [0.0]
    first = write_tone(tmp_path / "first.wav", 0.05)
    later = write_tone(tmp_path / "later.wav", 0.05)
    s = Settler(lambda: now[0])
    s.hint(str(first), 30.0, closed=True)  # nothing seen before the close
    s.hint(str(later), 30.0)
    assert readiness_of(s.check()) == [("first.wav", "waiting"), ("later.wav", "waiting")]
    now[0] = 0.1
    with later.open("ab") as fh:
        fh.write(b"\0\0")
    s.hint(str(later), 30.0)  # written after its last stat
    s.hint(str(later), 30.0, closed=True)  # and closed, no stat in between
    assert s.next_deadline() == 0.05
    now[0] = 0.05
    assert readiness_of(s.check()) == [("first.wav", "ready")]
    now[0] = 0.1
    assert readiness_of(s.check()) == [("later.wav", "waiting")]
    assert s.next_deadline() == pytest.approx(0.1 + CLOSE_CONFIRM_SECONDS)
    now[0] = 0.1 + CLOSE_CONFIRM_SECONDS
    assert readiness_of(s.check()) == [("later.wav", "ready")]


def test_a_writer_that_reopens_after_its_close_is_not_taken_early(tmp_path):
    """A close is refused when the file changed since the last stat (the writer is back before its events
    arrive), and cancelled by a write hint after it (the writer's events arrived): both wait the full window."""
    now = [0.0]
    unseen = write_tone(tmp_path / "unseen.wav", 0.05)
    seen = write_tone(tmp_path / "seen.wav", 0.05)
    s = Settler(lambda: now[0])
    s.hint(str(unseen), 30.0)
    s.hint(str(seen), 30.0)
    s.check()
    now[0] = 1.0
    for path in (unseen, seen):
        s.hint(str(path), 30.0, closed=True)
        with path.open("ab") as fh:  # reopened and appended
            fh.write(b"\0\0")
    s.hint(str(seen), 30.0)  # the append's event came in
    assert readiness_of(s.check()) == [("unseen.wav", "waiting")]  # seen.wav is no longer due
    assert s.next_deadline() == 31.0
    now[0] = 30.9
    assert s.check() == []
    now[0] = 31.0  # seen.wav's stat changed since the last one: its window starts again at this check
    assert readiness_of(s.check()) == [("seen.wav", "waiting"), ("unseen.wav", "ready")]
    now[0] = 61.0
    assert readiness_of(s.check()) == [("seen.wav", "ready")]


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


@pytest.mark.serial  # it takes every inotify instance of this user: nothing else may watch meanwhile
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


# -- any name the OS gives, and failures that stay with their file --------------------------------------------

ODD_NAMES = [
    b"caf\xe9.wav",  # not UTF-8 (Latin-1 from an old share)
    b"new\nline.wav",
    b"-leading dash.wav",
    b"a" * 251 + b".wav",  # 255 bytes, the longest name ext4 allows
]


def _write_bytes_name(folder: Path, name: bytes) -> str:
    """Create a small WAV under a bytes name; return the path as detection carries it (``os.fsdecode``)."""
    path = os.path.join(os.fsencode(folder), name)
    tmp = folder / "writing.part"
    write_tone(tmp, 0.05)
    os.rename(os.fsencode(tmp), path)
    return os.fsdecode(path)


def _deep_file(folder: Path, depth: int) -> str:
    """A file ``depth`` folders down (each a 20-byte name): a tree deeper than any real library."""
    parts = [os.fsencode(folder)] + [b"level-%014d" % i for i in range(depth)]
    os.makedirs(os.path.join(*parts))
    return _write_bytes_name(Path(os.fsdecode(os.path.join(*parts))), b"deep.wav")


@pytest.mark.parametrize("poll", [False, True], ids=["native", "polling"])
def test_any_name_the_os_gives_is_settled_and_handed_over(tmp_path, watch, poll):
    """Undecodable bytes, a newline, a leading dash, a 255-byte name and a 100-deep tree: found at start and
    by events, and handed to the sink as the exact ``os.fsdecode`` path."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    before = {_write_bytes_name(inbox, b"old-" + n if len(n) < 250 else b"o" + n[1:]) for n in ODD_NAMES}
    before.add(_deep_file(inbox / "old", 100))
    _, sink = watch(inbox, poll=poll, poll_interval=0.2)
    wait_for(lambda: {p for p, _ in sink.ready_files} == before, what="the start-up scan's files")
    after = {_write_bytes_name(inbox, n) for n in ODD_NAMES}
    # built beside the folder and moved in (mkdir -p in place races watchdog's recursive watch set-up, which
    # only warns, but pytest turns that warning into an error in watchdog's thread)
    deep = _deep_file(tmp_path / "album", 100)
    os.rename(tmp_path / "album", inbox / "album")
    after.add(deep.replace(str(tmp_path / "album"), str(inbox / "album"), 1))
    wait_for(lambda: {p for p, _ in sink.ready_files} == before | after, what="the files found by events")
    assert len(sink.ready_files) == len(before | after)


class FlakySink(RecordingSink):
    """Fails for names that are not UTF-8 the way a store that encodes paths as UTF-8 text would."""

    def __init__(self, fail_in: str) -> None:
        super().__init__()
        self.fail_in = fail_in
        self.calls: list[str] = []

    def known(self, path: str, sig: Signature) -> bool:
        if self.fail_in == "known":
            path.encode("utf-8")
        return super().known(path, sig)

    async def ready(
        self, folder: FolderConfig, path: str, rel_path: str, sig: Signature, *, live: bool = False
    ) -> None:
        self.calls.append(path)
        if self.fail_in == "ready":
            path.encode("utf-8")
        await super().ready(folder, path, rel_path, sig)

    async def ready_many(self, files: Sequence[Settled]) -> None:
        if self.fail_in == "ready":  # all or none, as one store transaction
            for f in files:
                f.path.encode("utf-8")
        await super().ready_many(files)


@pytest.mark.parametrize("fail_in", ["known", "ready"])
def test_a_sink_failure_stays_with_its_file_and_is_logged_once(tmp_path, fail_in):
    """sink.known or sink.ready raising for one file: logged once with the displayed name, other files go on."""
    import io
    import json

    from watcher.log import configure_logging

    inbox = tmp_path / "in"
    inbox.mkdir()
    bad = _write_bytes_name(inbox, b"caf\xe9.wav")
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    try:
        sink = FlakySink(fail_in)
        d = RunningDetector(FolderConfig(path=inbox, settle_seconds=0.2, rescan_interval=0.5), sink)
        try:
            write_tone(inbox / "good.wav", 0.05)
            wait_for(lambda: sink.names() == ["good.wav"], what="the good file")
            # rescans every 0.5 s bring the bad file back: it fails each time, and is logged once
            wait_for(lambda: out.getvalue().count("caf\\\\xe9.wav") >= 1, what="the failure logged")
            wait_for(lambda: fail_in == "known" or len(sink.calls) >= 3, what="the bad file tried at each rescan")
            write_tone(inbox / "later.wav", 0.05)
            wait_for(lambda: sorted(sink.names()) == ["good.wav", "later.wav"], what="detection still running")
            assert d.thread.is_alive()
        finally:
            d.stop()
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    failures = [e for e in lines if e.get("level") == "error"]
    assert len(failures) == 1, failures
    event = "detect.check_failed" if fail_in == "known" else "detect.record_failed"
    assert failures[0]["event"] == event and failures[0]["path"] == display(bad)
    assert "UnicodeEncodeError" in failures[0]["error"]
    assert bad not in {p for p, _ in sink.ready_files}


def test_entries_that_are_not_regular_files_or_lead_outside_are_skipped(tmp_path, watch):
    """A FIFO, a link loop, a link to a file outside the folder: reported, never handed over, never a hang."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    outside = write_tone(tmp_path / "secret" / "outside.wav", 0.05)
    with structlog.testing.capture_logs() as logs:
        d, sink = watch(inbox)
        os.mkfifo(inbox / "pipe.wav")
        staging = tmp_path / "staging"  # the loop arrives whole: a link seen alone would only be dangling
        staging.mkdir()
        os.symlink(inbox / "loops" / "loop-b.wav", staging / "loop-a.wav")
        os.symlink(inbox / "loops" / "loop-a.wav", staging / "loop-b.wav")
        staging.rename(inbox / "loops")
        os.symlink(outside, inbox / "link-out.wav")
        write_tone(inbox / "real.wav", 0.05)
        os.symlink(inbox / "real.wav", inbox / "link-in.wav")
        wait_for(lambda: sorted(sink.names()) == ["link-in.wav", "real.wav"], what="the real file and its link")
        wait_for(lambda: not d.detector.settler.candidates, what="every candidate decided")
    reasons = {Path(e["path"]).name: e["error"] for e in logs if e["event"] == "detect.skipped"}
    assert "pipe.wav" in reasons and "not a regular file" in reasons["pipe.wav"]
    assert "link-out.wav" in reasons and "outside the watched folder" in reasons["link-out.wav"]
    failed = {Path(e["path"]).name for e in logs if e["event"] == "detect.check_failed"}
    assert {"loop-a.wav", "loop-b.wav"} <= failed


def test_starting_a_watch_does_not_block_the_event_loop(tmp_path):
    """A watch whose start is stuck (a share that does not answer) leaves the loop free for other work."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    release = threading.Event()

    def slow_decision(folder: FolderConfig) -> tuple[bool, str]:
        release.wait(10)  # stands for a filesystem that takes seconds to answer
        return True, "polled (test)"

    async def main() -> tuple[int, bool]:
        det = Detector([FolderConfig(path=inbox, settle_seconds=0.2)], RecordingSink(), decide_polling=slow_decision)
        stop = asyncio.Event()
        started = asyncio.Event()
        task = asyncio.create_task(det.run(stop, on_first_scan=started.set))
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0.01)  # sleep-ok: counting loop turns while the watch start hangs
            ticks += 1
        was_started = started.is_set()
        release.set()
        await asyncio.wait_for(started.wait(), 10)
        stop.set()
        await asyncio.wait_for(task, 10)
        return ticks, was_started

    ticks, was_started = asyncio.run(main())
    assert ticks == 20 and not was_started


def test_inotify_queue_overflow_rescans_the_folder_at_once(tmp_path, watch):
    """A real kernel queue overflow (the reader held back while events pour in) triggers a rescan: a file
    whose events were dropped is found long before the next periodic rescan."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 200_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many events to overflow in a test")
    inbox = tmp_path / "in"
    inbox.mkdir()
    d, sink = watch(inbox, rescan_interval=3600)
    observer = d.detector.folders[str(inbox)].watch.observer
    assert d.detector.describe()[0]["mode"] == "native"
    with structlog.testing.capture_logs() as logs:
        # watchdog's reader thread takes this lock after each read: holding it stops the draining
        reader_lock = observer._inotify_fd._lock
        with reader_lock:
            fds = [os.open(inbox / f"flood-{i}.txt", os.O_WRONLY | os.O_CREAT) for i in range(2)]
            try:
                for i in range(limit + 4096):  # alternating files: identical neighbours would be merged
                    os.write(fds[i % 2], b"x")
            finally:
                for fd in fds:
                    os.close(fd)
            lost = write_tone(inbox / "lost in the overflow.wav", 0.05)
        wait_for(lambda: sink.names() == [lost.name], timeout=10, what="the file found by the overflow rescan")
    assert any(e["event"] == "watch.overflow" and e["folder"] == str(inbox) for e in logs)


def test_a_share_unmounted_under_the_folder_is_noticed_and_rescanned(tmp_path, watch):
    """A filesystem mounted on the watched folder, then unmounted: both changes are logged and rescanned."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    inbox = tmp_path / "in"
    inbox.mkdir()
    write_tone(inbox / "under the mount.wav", 0.05)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "share", str(inbox)], check=True)
    try:
        write_tone(inbox / "on the share.wav", 0.05)
        with structlog.testing.capture_logs() as logs:
            d, sink = watch(inbox)
            wait_for(lambda: sink.names() == ["on the share.wav"], what="the share's file")
            subprocess.run(["umount", "-l", str(inbox)], check=True)
            wait_for(lambda: "under the mount.wav" in sink.names(), what="the folder rescanned after the unmount")
        assert any(e["event"] == "folder.remounted" and e["folder"] == str(inbox) for e in logs)
        assert d.detector.describe()[0]["available"] is True
    finally:
        subprocess.run(["umount", "-l", str(inbox)], check=False, capture_output=True)


class _FussyFilter(PathFilter):
    """A filter that fails on one name, as a bad user pattern or a bug would."""

    def wants_file(self, rel: str) -> bool:
        if "fussy" in rel:
            raise ValueError("cannot match this name")
        return super().wants_file(rel)

    def file_matcher(self, folder: str) -> Callable[[str], object]:
        match = super().file_matcher(folder)

        def fussy(name: str) -> object:
            if "fussy" in name:
                raise ValueError("cannot match this name")
            return match(name)

        return fussy


def test_a_failing_filter_stays_with_its_file(tmp_path):
    """The filter raising on one name, at a scan and on an event hint: that name is logged, the rest is work."""
    from watcher.config import AUDIO_PATTERNS

    inbox = tmp_path / "in"
    write_tone(inbox / "fussy.wav", 0.05)
    write_tone(inbox / "plain.wav", 0.05)
    sink = RecordingSink()
    det = Detector([FolderConfig(path=inbox, settle_seconds=0.1)], sink)
    det.folders[str(inbox)].filter = _FussyFilter(AUDIO_PATTERNS)

    async def main() -> None:
        await det.scan()
        det.hint(str(inbox / "fussy.wav"))
        await det.settle_all(timeout=10)

    with structlog.testing.capture_logs() as logs:
        asyncio.run(main())
    assert sink.names() == ["plain.wav"]
    events = {e["event"] for e in logs if Path(e.get("path", "")).name == "fussy.wav"}
    assert events == {"scan.entry_failed", "detect.hint_failed"}, logs


def test_a_link_loop_already_there_is_reported_once(tmp_path):
    """A link loop found by scans (no event at all) is reported once, however many scans pass over it."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    os.symlink(inbox / "b.wav", inbox / "a.wav")
    os.symlink(inbox / "a.wav", inbox / "b.wav")
    write_tone(inbox / "real.wav", 0.05)
    sink = RecordingSink()
    det = Detector([FolderConfig(path=inbox, settle_seconds=0.1)], sink)

    async def main() -> None:
        for _ in range(3):
            await det.scan()
            await det.settle_all(timeout=10)

    with structlog.testing.capture_logs() as logs:
        asyncio.run(main())
    assert sink.names() == ["real.wav"]
    errors = [e for e in logs if e["log_level"] == "error"]
    assert sorted(Path(e["path"]).name for e in errors) == ["a.wav", "b.wav"], errors
    assert all(e["event"] == "detect.check_failed" and "symbolic links" in e["error"] for e in errors)


def test_a_close_after_write_is_taken_long_before_the_window(tmp_path, watch):
    """Real inotify events: a file written and closed in a folder with a 30 s window is ready at once."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    _, sink = watch(inbox, settle_seconds=30)
    data = write_tone(tmp_path / "src.wav", 0.2).read_bytes()
    with (inbox / "a.wav").open("wb") as fh:
        fh.write(data)
    wait_for(lambda: sink.names() == ["a.wav"], timeout=10, what="the closed file, well before its 30 s window")
    assert sink.ready_files[0][1].size == len(data)


def test_a_burst_of_hints_creates_no_task_per_file(tmp_path):
    """Thousands of new files at once: the loop runs a handful of tasks (one timer heap, no task per file),
    every file reaches the sink once, and files that settle together reach it in one call."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    sink = RecordingSink()
    det = Detector([FolderConfig(path=inbox, settle_seconds=0.2)], sink, health_every=0.5)
    count = 2000

    def write_all() -> None:
        for i in range(count):
            (inbox / f"{i}.wav").write_bytes(b"RIFF")

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop, started = asyncio.Event(), asyncio.Event()
        running = asyncio.create_task(det.run(stop, on_first_scan=started.set))
        await started.wait()
        writer = asyncio.create_task(asyncio.to_thread(write_all))
        most, deadline = 0, loop.time() + 60
        while len(sink.ready_files) < count:
            most = max(most, len(asyncio.all_tasks()))
            assert loop.time() < deadline, f"{len(sink.ready_files)} of {count} files settled"
            await asyncio.sleep(0.005)  # sleep-ok: the sampling step of a deadline-bounded wait
        await writer
        stop.set()
        await running
        return most

    most = asyncio.run(main())
    assert most <= 6, most  # this test, the detector, its stop waker, the writer: tasks do not grow with files
    assert len({p for p, _ in sink.ready_files}) == len(sink.ready_files) == count
    assert max(sink.batches) > 1


def test_settle_all_looks_at_each_file_at_its_deadline_only(tmp_path):
    """`watcher scan` waits for deadlines: each file is stat-ed when first seen and once at its deadline."""
    inbox = tmp_path / "in"
    for name in ("a.wav", "b.wav", "c.wav"):
        write_tone(inbox / name, 0.05)
    stats: Counter[str] = Counter()

    def counting_stat(path: str) -> os.stat_result:
        stats[Path(path).name] += 1
        return os.stat(path)

    sink = RecordingSink()
    det = Detector([FolderConfig(path=inbox, settle_seconds=0.6)], sink)
    det.settler = Settler(time.monotonic, stat=counting_stat, known=sink.known)

    async def main() -> None:
        await det.scan()
        await det.settle_all(timeout=10)

    asyncio.run(main())
    assert sorted(sink.names()) == ["a.wav", "b.wav", "c.wav"]
    assert stats == {"a.wav": 2, "b.wav": 2, "c.wav": 2}
    assert sink.batches == [3]  # settled together: one call


def test_a_batch_the_sink_refuses_is_recorded_file_by_file(tmp_path):
    """When the sink refuses the files that settled together, each is tried alone: the good ones are recorded,
    the bad one is logged once and never leaves the detector."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    bad = _write_bytes_name(inbox, b"caf\xe9.wav")
    write_tone(inbox / "a.wav", 0.05)
    write_tone(inbox / "b.wav", 0.05)
    sink = FlakySink("ready")
    det = Detector([FolderConfig(path=inbox, settle_seconds=0.1)], sink)

    async def main() -> None:
        await det.scan()
        await det.settle_all(timeout=10)

    with structlog.testing.capture_logs() as logs:
        asyncio.run(main())
    assert sorted(sink.names()) == ["a.wav", "b.wav"]
    assert sink.batches == [] and sorted(sink.calls) == sorted([bad, str(inbox / "a.wav"), str(inbox / "b.wav")])
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [(e["event"], e["path"]) for e in errors] == [("detect.record_failed", display(bad))]


def test_the_loop_sleeps_while_nothing_is_due(tmp_path):
    """No tick and no spinning: with nothing to settle (and a folder that is away, whose rescan is overdue), the
    loop wakes only for its health checks."""
    sink = RecordingSink()
    det = Detector([FolderConfig(path=tmp_path / "away", rescan_interval=0.01)], sink, health_every=0.1)
    checks = 0
    check_once = det.check_once

    async def counting_check() -> float | None:
        nonlocal checks
        checks += 1
        return await check_once()

    det.check_once = counting_check  # type: ignore[method-assign]
    healths = 0
    health = det.watches.health

    async def counting_health() -> None:
        nonlocal healths
        healths += 1
        await health()

    det.watches.health = counting_health  # type: ignore[method-assign]

    async def main() -> None:
        stop, started = asyncio.Event(), asyncio.Event()
        running = asyncio.create_task(det.run(stop, on_first_scan=started.set))
        await started.wait()
        deadline = asyncio.get_running_loop().time() + 20
        while healths < 5:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)  # sleep-ok: the polling step of a deadline-bounded wait
        stop.set()
        await running

    asyncio.run(main())
    assert det.describe()[0]["available"] is False
    assert checks <= healths + 2, (checks, healths)


@pytest.mark.parametrize(
    ("path", "root"),
    [
        ("/in/a.wav", "/in"),
        ("/in/sub/a.wav", "/in"),
        ("/in", "/in"),
        ("/a.wav", "/"),
        ("/in/.hidden/a.wav", "/in"),
        ("/in//sub/./a.wav", "/in"),
        ("/in/sub/../a.wav", "/in"),
        ("/in/sub/", "/in"),
    ],
)
def test_a_hinted_path_is_placed_in_its_folder_as_os_path_would(path, root):
    """The fast way a hint's path is normalised and made relative to its folder agrees with os.path."""
    from watcher.detect.folders import absolute_path, inside

    normal = absolute_path(path)
    assert normal == os.path.abspath(path)
    assert inside(normal, root) == os.path.relpath(normal, root)


def test_the_observer_is_not_woken_by_listing_or_reading_the_folder(tmp_path):
    """Only the events the handler acts on are asked of the kernel: a scan listing the folders and a job reading a
    file send nothing through the observer, while a new file still does."""
    import sys

    from watchdog.events import FileSystemEventHandler

    from watcher.detect.watch import start_watch

    if not sys.platform.startswith("linux"):
        pytest.skip("inotify's event mask is what is checked")
    inbox = tmp_path / "in"
    write_tone(inbox / "sub" / "old.wav", 0.05)
    hints: list[tuple[str, bool, bool]] = []

    def hint(path: str, *, is_dir: bool, closed: bool) -> None:
        hints.append((path, is_dir, closed))

    fw = start_watch(str(inbox), recursive=True, polling=False, poll_interval=1.0, hint=hint,
                     reason="test")  # fmt: skip
    seen: list[str] = []

    class Recorder(FileSystemEventHandler):
        def on_any_event(self, event: object) -> None:
            seen.append(type(event).__name__)

    try:
        observer = fw.observer
        assert not isinstance(observer, DirPoller)
        observer.add_handler_for_watch(Recorder(), next(iter(observer.emitters)).watch)
        for folder in (inbox, inbox / "sub"):
            with os.scandir(folder) as it:
                list(it)
        (inbox / "sub" / "old.wav").read_bytes()
        (inbox / "new.wav").write_bytes(b"RIFF")
        wait_for(lambda: "FileClosedEvent" in seen, what="the new file's events")
    finally:
        fw.stop()
    assert not {"FileOpenedEvent", "FileClosedNoWriteEvent", "DirModifiedEvent"} & set(seen), seen
    assert {h[0] for h in hints} == {str(inbox / "new.wav")}


def test_the_sinks_questions_are_asked_off_the_loop_and_its_records_made_on_it(tmp_path):
    """As the detector's docstring says: ``known`` and ``recorded`` (reads that may wait on a share or a busy
    store) run in detection's pool, ``ready_many`` (one store transaction per check) is awaited on the event loop."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    for n in range(2):
        write_tone(inbox / f"{n}.wav", 0.05)
    calls: list[tuple[str, bool]] = []

    class ThreadNotingSink(RecordingSink):
        def _note(self, what: str) -> None:
            try:
                asyncio.get_running_loop()
                calls.append((what, True))
            except RuntimeError:
                calls.append((what, False))

        def known(self, path: str, sig: Signature) -> bool:
            self._note("known")
            return super().known(path, sig)

        def recorded(self, folder: str) -> Signatures:
            self._note("recorded")
            return {}

        async def ready_many(self, files: Sequence[Settled]) -> None:
            self._note("ready_many")
            await super().ready_many(files)

    async def go() -> None:
        detector = Detector([FolderConfig(path=inbox, settle_seconds=0.05)], ThreadNotingSink())
        try:
            await detector.scan()
            await detector.settle_all(timeout=10)
        finally:
            detector._pool.shutdown()

    asyncio.run(go())
    assert sorted(set(calls)) == [("known", False), ("ready_many", True), ("recorded", False)]
