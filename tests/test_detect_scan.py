"""The start-up walk against a real store: files already recorded as they are cost no question and no hint; and
the filter's string fast path the walk relies on."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import pytest
import structlog

from watcher.app import StoreSink
from watcher.config import AUDIO_PATTERNS, FolderConfig
from watcher.detect.detector import Detector
from watcher.detect.filters import PathFilter
from watcher.detect.poll import Listing
from watcher.events import Events
from watcher.store import NewRevision, Store
from watcher.store.aio import AsyncStore
from watcher.store.models import Signatures, group_by_folder

pytestmark = pytest.mark.timeout(60)
KNOWN = 10_000


def build(root: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = root / f"d{i // 500:02d}" / f"f{i:05d}.wav"
        if i % 500 == 0:
            path.parent.mkdir(parents=True)
        path.write_bytes(b"RIFF")
        paths.append(path)
    return paths


def test_a_restart_over_known_files_asks_the_store_once_and_hints_only_what_is_new(tmp_path):
    """10,000 files recorded as they are: the walk makes one query for the folder; only the new file, the
    rewritten one and the one never recorded become candidates, and only they are looked up one by one."""
    inbox = tmp_path / "in"
    paths = build(inbox, KNOWN)
    store = Store(tmp_path / "state" / "watcher.db")
    store._db.execute("PRAGMA synchronous=OFF")  # 10,000 registrations: durability is not what is tested here
    try:
        stats = [(p, p.stat()) for p in paths]
        store.register_revisions(
            [NewRevision(str(inbox), str(p), os.path.relpath(p, inbox), st.st_size, st.st_mtime_ns, st.st_ino)
             for p, st in stats],
            jobs=[],
        )  # fmt: skip
        changed = paths[17]
        changed.write_bytes(b"RIFF, rewritten longer")
        new = inbox / "d03" / "new.wav"
        new.write_bytes(b"RIFF")
        (inbox / "notes.txt").write_text("not audio")  # filtered out: neither hinted nor asked about

        pipeline = SimpleNamespace(name="analyze", first_step="analyze")
        sink = StoreSink(AsyncStore(store), [pipeline], wake=lambda: None, events=Events())  # type: ignore[list-item]
        detector = Detector([FolderConfig(path=inbox, settle_seconds=0.1)], sink)
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)

        async def scan() -> int:
            return await detector.scan()

        hinted = asyncio.run(scan())
        assert statements == [f"SELECT path, size, mtime_ns, inode FROM files WHERE folder='{inbox}' AND current=1"]
        assert hinted == 2
        assert sorted(p for p, *_ in detector._hints) == sorted([str(changed), str(new)])

        statements.clear()
        asyncio.run(detector.settle_all(timeout=20))
        lookups = [s for s in statements if s.startswith("SELECT 1 FROM files")]
        assert len(lookups) == 2  # known_revision for the two candidates only, not for 10,000 files
        revisions = {p: store.current_revision(p) for p in (str(changed), str(new))}
        assert all(v is not None for v in revisions.values())
        assert revisions[str(changed)].size == len(b"RIFF, rewritten longer")  # type: ignore[union-attr]
    finally:
        store.close()


def test_a_store_that_cannot_answer_leaves_every_file_to_the_one_by_one_check(tmp_path):
    """The folder query failing is logged once; every file is then hinted, as if nothing was recorded."""
    inbox = tmp_path / "in"
    build(inbox, 3)

    class Failing:
        def known(self, path: str, sig: object) -> bool:
            return False

        async def ready(self, *args: object, **kwargs: object) -> None:
            return None

        def recorded(self, folder: str) -> Signatures:
            raise OSError("the store is away")

    detector = Detector([FolderConfig(path=inbox)], Failing())

    async def twice() -> list[int]:
        return [await detector.scan(), await detector.scan()]

    with structlog.testing.capture_logs() as logs:
        assert asyncio.run(twice()) == [3, 3]
    failures = [e for e in logs if e["event"] == "scan.recorded_failed"]
    assert [e["log_level"] for e in failures] == ["error", "debug"]


class _PathlibFilter(PathFilter):
    """The filter's rules read through pathlib for every path: what the string fast path must agree with."""

    def wants_dir(self, rel: str) -> bool:
        return not self._excluded_path(PurePosixPath(rel))

    def wants_file(self, rel: str) -> bool:
        path = PurePosixPath(rel)
        if self._excluded_path(path):
            return False
        return bool(self._inc_name.fullmatch(path.name) or self._inc_path.fullmatch(path.as_posix()))


@pytest.mark.parametrize(
    ("include", "exclude", "own_dirs"),
    [
        (AUDIO_PATTERNS, (), ()),
        (AUDIO_PATTERNS, ("keep/*.wav", "*.mp3"), ("out", "done/sub")),
        (("*.wav", "albums/*/*.wav"), ("b*",), (".",)),
    ],
)
def test_the_filters_fast_path_agrees_with_pathlib(include, exclude, own_dirs):
    """Every combination of odd components (".", "", excluded names, own folders, path patterns) is judged the same
    by the string fast path a walk uses as by pathlib."""
    parts = ["a", "b.wav", "@eaDir", "out", "done", "sub", ".", "", "x.WAV", ".DS_Store", "c.part", ".t.wav.Ab12Cd"]
    fast, slow = PathFilter(include, exclude, own_dirs), _PathlibFilter(include, exclude, own_dirs)
    for k in (1, 2, 3):
        for combo in itertools.product(parts, repeat=k):
            joined = "/".join(combo)
            for rel in (joined, joined + "/", "./" + joined, "albums/" + joined, "keep/" + joined):
                assert fast.wants_file(rel) == slow.wants_file(rel), rel
                assert fast.wants_dir(rel) == slow.wants_dir(rel), rel


@pytest.mark.parametrize(
    ("include", "exclude", "own_dirs"),
    [
        (AUDIO_PATTERNS, (), ()),
        (AUDIO_PATTERNS, ("keep/*.wav", "*.mp3"), ("out", "done/sub", "a/out")),
        (("*.wav", "albums/*/*.wav"), ("b*",), (".",)),
        (("*.wav", "*/x.*"), ("@eaDir", ".hidden"), ("sub",)),
    ],
)
def test_the_per_folder_matcher_agrees_with_wants_file(include, exclude, own_dirs):
    """What a walk asks once per folder judges every name as :meth:`PathFilter.wants_file` judges the whole
    relative path: odd, hidden, excluded and not UTF-8 names, in plain, excluded, own and odd folders."""
    undecodable = os.fsdecode(b"caf\xe9.wav")  # a Latin-1 name: not UTF-8, carried as surrogate escapes
    names = ["b.wav", "x.WAV", "a", "out", "sub", "done", "@eaDir", ".DS_Store", "c.part", ".t.wav.Ab12Cd",
             ".hidden", ".hidden.wav", "b", "notes.txt", "x.mp3", undecodable, "~$x.wav", "._b.wav"]  # fmt: skip
    folders = ["", "a", "a/b", "out", "out/x", "done", "done/sub", "done/sub/deep", "keep", "albums", "albums/one",
               "@eaDir", "a/@eaDir", ".hidden", "a/.hidden", ".trash", "sub", "a/out", "b", "bx", undecodable,
               "./a", "a/", "a//b", "."]  # fmt: skip
    path_filter = PathFilter(include, exclude, own_dirs)
    for folder in folders:
        match = path_filter.file_matcher(folder)
        for name in names:
            rel = f"{folder}/{name}" if folder else name
            assert bool(match(name)) == path_filter.wants_file(rel), (folder, name)


@pytest.mark.parametrize("snapshot", [False, True], ids=["native", "polled"])
def test_a_restart_walk_hints_what_changed_and_skips_what_is_excluded(tmp_path, snapshot):
    """The start-up walk over recorded files: new files (one in a hidden folder, one not UTF-8 named) and those
    whose size, mtime or inode changed are hinted; files as recorded, excluded folders (``@eaDir``, a hidden one
    the user excluded, own output) and non-audio files are not; a link to outside the folder is refused."""
    from watcher.detect.scan import changed_files

    inbox = tmp_path / "in"
    files = {
        "same.wav": b"RIFF",
        "a/same.wav": b"RIFF",
        "a/resized.wav": b"RIFF",
        "a/touched.wav": b"RIFF",
        "a/replaced.wav": b"RIFF",
        "a/new.wav": b"RIFF",
        "@eaDir/thumb.wav": b"RIFF",
        "a/@eaDir/thumb.wav": b"RIFF",
        ".secret/x.wav": b"RIFF",
        ".visible/x.wav": b"RIFF",
        "out/result.wav": b"RIFF",
        "a/notes.txt": b"text",
    }
    for rel, data in files.items():
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(data)
    odd = os.fsencode(str(inbox / "a")) + b"/caf\xe9.wav"
    with open(odd, "wb") as fh:
        fh.write(b"RIFF")
    outside = tmp_path / "outside.wav"
    outside.write_bytes(b"RIFF")
    os.symlink(outside, inbox / "a" / "link.wav")

    def sig(rel: str) -> tuple[int, int, int]:
        st = (inbox / rel).stat()
        return st.st_size, st.st_mtime_ns, st.st_ino

    flat: dict[str, tuple[int, int, int | None]] = {
        str(inbox / rel): sig(rel) for rel in files if rel not in ("a/new.wav", ".visible/x.wav", "a/notes.txt")
    }  # (a file in an excluded folder may be recorded from before the filter changed; a text file never is)
    flat[str(inbox / "a" / "same.wav")] = (*sig("a/same.wav")[:2], None)  # a store that keeps no inode
    (inbox / "a" / "resized.wav").write_bytes(b"RIFF, longer")
    os.utime(inbox / "a" / "touched.wav", ns=(1, 1))
    size, mtime_ns, inode = flat[str(inbox / "a" / "replaced.wav")]
    flat[str(inbox / "a" / "replaced.wav")] = (size, mtime_ns, (inode or 0) + 1)
    recorded = group_by_folder((path, *signature) for path, signature in flat.items())

    path_filter = PathFilter(AUDIO_PATTERNS, (".secret",), ("out",))
    listing = Listing(time.monotonic) if snapshot else None  # a polled folder's walk compares in its own loop
    with structlog.testing.capture_logs() as logs:
        changed, seen = changed_files(str(inbox), path_filter, recorded, listing=listing)
    expected = {"a/resized.wav", "a/touched.wav", "a/replaced.wav", "a/new.wav", ".visible/x.wav"}
    assert sorted(changed) == sorted([str(inbox / rel) for rel in expected] + [os.fsdecode(odd)])
    assert seen == 2 + len(expected) + 1  # the two unchanged, the changed, the odd name; not the refused link
    assert [e["event"] for e in logs] == ["scan.link_outside"]

    start = str(inbox / "a")  # a sub-folder's scan (a new folder): every wanted file in it, as new
    changed, _ = changed_files(str(inbox), path_filter, {}, start=start)
    in_a = ["same.wav", "resized.wav", "touched.wav", "replaced.wav", "new.wav", os.path.basename(os.fsdecode(odd))]
    assert sorted(changed) == sorted(os.path.join(start, name) for name in in_a)


def test_the_first_scan_uses_the_answer_asked_while_the_watches_start(tmp_path):
    """`Detector.run` asks the store about the first folder while the observers start, and its first scan
    compares with that answer: the folder is asked once, and only the file not recorded as it is gets hinted."""
    inbox, missing = tmp_path / "in", tmp_path / "not-there"
    paths = build(inbox, 3)
    new = inbox / "d00" / "new.wav"
    new.write_bytes(b"RIFF")

    class Sink:
        def __init__(self) -> None:
            self.asked: list[str] = []

        def known(self, path: str, sig: object) -> bool:
            return False

        async def ready(self, *args: object, **kwargs: object) -> None:
            return None

        async def ready_many(self, files: object) -> None:
            return None

        def recorded(self, folder: str) -> Signatures:
            self.asked.append(folder)
            return group_by_folder((str(p), st.st_size, st.st_mtime_ns, st.st_ino) for p in paths if (st := p.stat()))

    sink = Sink()
    detector = Detector([FolderConfig(path=inbox), FolderConfig(path=missing)], sink)

    async def first_scan() -> None:
        stop = asyncio.Event()
        await detector.run(stop, on_first_scan=stop.set)

    asyncio.run(first_scan())
    assert sink.asked.count(str(inbox)) == 1
    assert set(sink.asked) <= {str(inbox), str(missing)}
    assert [p for p, *_ in detector._hints] == [str(new)]


def test_a_scan_of_many_new_files_lets_the_loop_serve_others_between_hints(tmp_path, monkeypatch):
    """A first start over 120,000 new files hinted them all in one go on the loop (two seconds without a pulse or
    a page answer); the hints now come a batch at a time, the loop serving others between."""
    from watcher.detect import detector as module

    monkeypatch.setattr(module, "PER_TURN", 10)
    inbox = tmp_path / "in"
    build(inbox, 35)

    class Empty:
        def known(self, path: str, sig: object) -> bool:
            return False

        async def ready(self, *args: object, **kwargs: object) -> None:
            return None

        def recorded(self, folder: str) -> Signatures:
            return {}

    detector = Detector([FolderConfig(path=inbox)], Empty())
    order: list[str] = []
    hint = detector.hint
    detector.hint = lambda path, **kw: (order.append("hint"), hint(path, **kw))[1]  # type: ignore[method-assign]

    async def scan_beside_a_ticker() -> int:
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                order.append("tick")
                await asyncio.sleep(0)  # sleep-ok: a bare yield to the loop, what the ticker counts

        task = asyncio.create_task(ticker())
        try:
            return await detector.scan()
        finally:
            done.set()
            await task

    assert asyncio.run(scan_beside_a_ticker()) == 35
    first, last = order.index("hint"), len(order) - 1 - order[::-1].index("hint")
    assert order.count("hint") == 35 and order[first:last].count("tick") >= 3
