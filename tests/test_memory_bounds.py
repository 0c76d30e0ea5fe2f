"""Memory does not grow with work done: every in-memory map a daemon keeps about files or folders has a bound,
or loses its entry when the file is done or gone. One test per bound, each failing if its bound is removed."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.conftest import write_tone
from watcher.audiofile import Signature
from watcher.config import FolderConfig
from watcher.detect.detector import Detector, Settled
from watcher.detect.failures import FailureLog
from watcher.detect.filters import DIR_CACHE, PathFilter
from watcher.store import Store
from watcher.store.models import Signatures, group_by_folder

pytestmark = pytest.mark.timeout(30)


def test_failures_remember_at_most_their_limit_least_recent_first() -> None:
    """A share full of failing files: only the last ``limit`` paths are remembered; a forgotten one that fails
    again is logged again, a remembered one is not."""
    failures = FailureLog(limit=3)
    with capture_logs() as logs:
        for n in range(5):
            failures.report("detect.check_failed", f"/in/{n}.wav", "EIO", "retried")
        failures.report("detect.check_failed", "/in/4.wav", "EIO", "retried")  # remembered: debug only
        failures.report("detect.check_failed", "/in/0.wav", "EIO", "retried")  # forgotten: news again
    assert len(failures) == 3
    errors = [e["path"] for e in logs if e["log_level"] == "error"]
    assert errors == ["/in/0.wav", "/in/1.wav", "/in/2.wav", "/in/3.wav", "/in/4.wav", "/in/0.wav"]


class RefusingSink:
    """A store that refuses every file (as a full disk would)."""

    def known(self, path: str, sig: Signature) -> bool:
        return False

    def ready(self, folder: FolderConfig, path: str, rel_path: str, sig: Signature, *, live: bool = False) -> None:
        raise OSError(28, "No space left on device")

    def ready_many(self, files: Sequence[Settled]) -> None:
        raise OSError(28, "No space left on device")

    def recorded(self, folder: str) -> Signatures:
        return {}


def test_a_file_that_failed_and_was_deleted_leaves_nothing_in_the_detector(tmp_path: Path) -> None:
    """The detector remembers a failed file (to log it once) only while it is there: deleted, it is forgotten,
    and no candidate or failure is left about it."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    files = [write_tone(inbox / f"{n}.wav", 0.05) for n in range(3)]

    async def go() -> tuple[int, int, int]:
        detector = Detector([FolderConfig(path=inbox, settle_seconds=0.05)], RefusingSink())
        try:
            for f in files:
                detector.hint(str(f))
            await detector.settle_all(timeout=10)
            failed = len(detector._failures)
            for f in files:
                f.unlink()
                detector.hint(str(f))
            await detector.settle_all(timeout=10)
            return failed, len(detector._failures), len(detector.settler.candidates)
        finally:
            detector._pool.shutdown()

    assert asyncio.run(go()) == (3, 0, 0)


def test_the_filter_remembers_a_bounded_number_of_folders() -> None:
    """A walk over more folders than the filter's memory keeps at most DIR_CACHE of them."""
    wanted = PathFilter(["*.wav"], [])
    for n in range(DIR_CACHE + 500):
        assert wanted.wants_file(f"session-{n}/take.wav")
    assert 0 < len(wanted._dir_names_excluded) <= DIR_CACHE


def test_the_stores_page_cache_is_bounded(tmp_path: Path) -> None:
    """SQLite keeps recently read pages in memory per connection; the store's connections keep at most 2 MiB
    (cache_size negative: KiB), whatever the store's size, so RSS stops growing once the cache is full."""
    store = Store(tmp_path / "watcher.db")
    readonly = Store(tmp_path / "watcher.db", readonly=True)
    try:
        for s in (store, readonly):
            (size,) = s._db.execute("PRAGMA cache_size").fetchone()
            assert -2048 <= size < 0, size
    finally:
        readonly.close()
        store.close()
    assert sqlite3.sqlite_version_info >= (3, 12)  # the first with a 2 MB default (before: 2000 pages)


def test_a_reader_that_never_reads_the_live_feed_holds_a_bounded_queue() -> None:
    """The page's feed: a tab that stopped reading (asleep, its socket stuck) misses events beyond
    QUEUE_LIMIT instead of queueing every file's event in the daemon."""
    from watcher.web.live import QUEUE_LIMIT, LiveEvents

    async def go() -> list[int]:
        live = LiveEvents()
        stream = live.stream()
        assert await anext(stream) == ": connected\n\n"
        for n in range(QUEUE_LIMIT + 250):
            live.file_settled("/in", f"/in/{n}.wav")
        sizes = [q.qsize() for q in live.queues]
        await stream.aclose()
        return [*sizes, len(live.queues)]

    assert asyncio.run(go()) == [QUEUE_LIMIT, 0]


def test_the_pages_sidecar_cache_is_bounded(tmp_path: Path) -> None:
    """The page reads sidecars through a cache; reading more sidecars than it keeps never holds them all."""
    from watcher.web import data

    data._sidecar_cache.clear()
    for n in range(5200):
        path = tmp_path / f"{n}.json"
        path.write_text(json.dumps({"n": n}))
        assert data.sidecar(str(path)) == {"n": n}
    assert 0 < len(data._sidecar_cache) <= 5001
    data._sidecar_cache.clear()


def test_a_rescan_does_not_hold_a_folders_listing(tmp_path: Path) -> None:
    """A rescan walks a folder entry by entry: its peak beside the store's answer stays a few bytes per file, not
    the whole listing (about 750 bytes a file when each folder was read into a list first), so the high-water
    mark of a daemon rescanning a growing folder does not grow with it."""
    import tracemalloc

    from watcher.detect.scan import changed_files

    root = tmp_path / "in"
    root.mkdir()
    flat = []
    for n in range(3000):
        path = root / f"{n:06d}.wav"
        path.write_bytes(b"x")
        st = path.stat()
        flat.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino))
    recorded = group_by_folder(flat)
    tracemalloc.start()
    try:
        changed, seen = changed_files(str(root), PathFilter(["*.wav"], []), recorded)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (changed, seen) == ([], 3000)
    assert peak / 3000 < 100, f"{peak / 3000:.0f} bytes per file"
