"""The jobs under some paths (`Store.jobs_under`): exactly those of the current revisions at or under the paths,
in both stores, read through an index; and the commands that name paths (`scan PATH` through the daemon or on its
own, `retry PATH`) read only those, never every job of the store."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_settings, wait_for, write_tone
from watcher.commands.common import under
from watcher.control import ask
from watcher.emulator import Emulator
from watcher.store import Store

pytestmark = pytest.mark.timeout(120)
JOBS = [("analyze", "analyze"), ("archive", "check")]
BAD = os.fsdecode(b"\xff")  # a byte that is not UTF-8: the name is stored as bytes
NAMES = [
    "a/b/x.wav",
    "a/b/sub/y.wav",
    f"a/b/{BAD}.wav",
    "a/bc/z.wav",  # a sibling whose name starts as the folder's does
    "a/b.wav",
    "a/b0.wav",  # "0" follows "/": the first name past the range of a/b/
    f"a/{BAD}/q.wav",
    "top.wav",
]


def record(store: Any, folder: str, rel: str, size: int = 1) -> None:
    store.register_revision(
        folder=folder, path=f"{folder}/{rel}", rel_path=rel, size=size, mtime_ns=1, inode=len(rel), jobs=JOBS, now=1.0
    )


def found(store: Any, *paths: str) -> list[tuple[str, str, int]]:
    """(path, pipeline, size) of each job under ``paths``, checked against every current job filtered here."""
    jobs = store.jobs_under(list(paths))
    assert sorted(j.id for j in jobs) == sorted(j.id for j in store.jobs_of_current() if under(j.file.path, paths))
    order = [(os.fsencode(j.file.path), j.pipeline) for j in jobs]
    assert order == sorted(order) and len(set(order)) == len(order)  # path order, each job once
    return [(j.file.path, j.pipeline, j.file.size) for j in jobs]


def files(rows: list[tuple[str, str, int]]) -> set[str]:
    return {path for path, _, _ in rows}


def test_the_jobs_under_paths_are_exactly_those_of_current_revisions_there(store):
    """A folder (not its sibling with a longer name, nor a file named like it), the root of the watched folder, a
    file, names that are not UTF-8 (below a text folder and as a folder), overlapping paths (each job once), and a
    replaced revision (only the current one's jobs)."""
    w = "/w"
    store.use_folders({w: "folder-w"})
    for rel in NAMES:
        record(store, w, rel)
    record(store, w, "a/b/x.wav", size=2)  # a new content: the first revision is replaced
    below_b = {f"{w}/a/b/x.wav", f"{w}/a/b/sub/y.wav", f"{w}/a/b/{BAD}.wav"}
    assert files(found(store, f"{w}/a/b")) == below_b
    assert files(found(store, f"{w}/a/b/")) == below_b
    assert files(found(store, w)) == files(found(store, f"{w}/")) == {f"{w}/{rel}" for rel in NAMES}
    assert found(store, f"{w}/a/b/x.wav") == [(f"{w}/a/b/x.wav", "analyze", 2), (f"{w}/a/b/x.wav", "archive", 2)]
    assert files(found(store, f"{w}/a/{BAD}")) == {f"{w}/a/{BAD}/q.wav"}
    assert files(found(store, f"{w}/a/b/{BAD}.wav")) == {f"{w}/a/b/{BAD}.wav"}
    assert files(found(store, f"{w}/a/b", f"{w}/a/b/sub", f"{w}/a/b/x.wav")) == below_b
    assert files(found(store, f"{w}/a/bc", f"{w}/top.wav")) == {f"{w}/a/bc/z.wav", f"{w}/top.wav"}
    assert found(store, f"{w}/a/nothing") == [] and found(store, "/elsewhere") == []
    assert files(found(store, "/")) == {f"{w}/{rel}" for rel in NAMES}


def test_a_shared_store_finds_other_nodes_folders_by_the_path_they_recorded(open_store, request):
    """PostgreSQL: a folder another node watches under another path is found by this node's path; a folder this
    node does not watch, by the path recorded for it (and never by the other node's path for one it watches)."""
    if request.node.callspec.params["open_store"] != "postgres":
        pytest.skip("a store of one machine has no other node")
    other, mine = open_store(), open_store()
    other.use_folders({"/mnt/w": "folder-w", "/o": "folder-o"})
    mine.use_folders({"/w": "folder-w"})
    for rel in NAMES:
        record(other, "/mnt/w", rel)
        record(other, "/o", rel)
    assert files(found(mine, "/w/a/b")) == {"/w/a/b/x.wav", "/w/a/b/sub/y.wav", f"/w/a/b/{BAD}.wav"}
    assert files(found(mine, "/o/a/b")) == {"/o/a/b/x.wav", "/o/a/b/sub/y.wav", f"/o/a/b/{BAD}.wav"}
    assert files(found(mine, "/o/a/b0.wav")) == {"/o/a/b0.wav"}
    assert found(mine, "/mnt/w") == []
    assert files(found(mine, "/")) == {f"{f}/{rel}" for f in ("/w", "/o") for rel in NAMES}


def test_retry_of_a_folder_of_more_files_than_one_statement_takes(store):
    """`retry PATH` of a big folder: its files' paths go to the store in chunks, each job reset once."""
    from watcher.store import NewRevision

    n = 1201  # past two chunks of 500
    revisions = [NewRevision("/w", f"/w/big/f{k}.wav", f"big/f{k}.wav", 1, 1, k) for k in range(n)]
    store.register_revisions(revisions, jobs=[("analyze", "analyze")], now=1.0)
    record(store, "/w", "bigger/f.wav")
    if isinstance(getattr(store, "_db", None), sqlite3.Connection):
        store._db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)  # SQLite's limit before 3.32
    selected = [j.file.path for j in store.jobs_under(["/w/big"])]
    assert len(selected) == n and store.retry(paths=selected) == n


def test_sqlite_reads_the_jobs_under_paths_through_the_path_index(tmp_path):
    """Each statement searches ``files_by_path`` by the path or its range, then the jobs by file: no scan."""
    store = Store(tmp_path / "w.db")
    try:
        for rel in NAMES:
            record(store, "/w", rel)
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        store.jobs_under(["/w/a/b", f"/w/a/{BAD}", "/w/top.wav"])
        store._db.set_trace_callback(None)
        assert len(statements) == 8  # per path: itself, its range as bytes and (a text name) as text
        for sql in statements:
            plan = [row[3] for row in store._db.execute("EXPLAIN QUERY PLAN " + sql)]
            assert plan[0].startswith("SEARCH f USING INDEX files_by_path (path"), (sql, plan)
            assert plan[1:] == ["SEARCH j USING INDEX jobs_by_file (file_id=?)"], (sql, plan)
    finally:
        store.close()


# -- the commands read the jobs under their paths, never every job ---------------------------------------------


@pytest.fixture
def no_whole_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading every current job fails: a command that names paths must not need it (its cost is the store's)."""
    from watcher.store.postgres import PostgresStore

    def whole(self: Any) -> Any:
        raise AssertionError("a command that names paths read every current job of the store")

    monkeypatch.setattr(Store, "jobs_of_current", whole)
    monkeypatch.setattr(PostgresStore, "jobs_of_current", whole)


def test_scan_through_the_daemon_and_retry_read_only_the_jobs_under_their_paths(
    tmp_path, inbox: Path, emulator: Emulator, run_daemon, no_whole_store
):
    """`watcher scan PATH` sent to the running daemon waits on the jobs under PATH (not the store's) and reports
    them; `watcher retry PATH` finds what to retry the same way."""
    scan_and_retry(make_settings(tmp_path, inbox, emulator.url), inbox, run_daemon)


def test_the_same_with_a_shared_store(tmp_path, inbox: Path, emulator: Emulator, run_daemon, no_whole_store, pg_url):
    """As above, the store in PostgreSQL."""
    settings = make_settings(tmp_path, inbox, emulator.url)
    settings = settings.model_copy(update={"store": settings.store.model_copy(update={"url": pg_url})})
    scan_and_retry(settings, inbox, run_daemon)


def scan_and_retry(settings: Any, inbox: Path, run_daemon: Any) -> None:
    """Two files done by the daemon, a third dropped in sub/, `scan sub` through the daemon, `retry sub`."""
    from watcher.commands.manage import retry

    (inbox / "sub").mkdir()
    write_tone(inbox / "sub" / "a.wav", 0.2)
    write_tone(inbox / "subway.wav", 0.2, freq=550.0)
    d = run_daemon(settings)
    done = [inbox / "sub" / "a.wav.analysis.json", inbox / "subway.wav.analysis.json"]
    wait_for(lambda: all(p.exists() for p in done), timeout=60, what="both files done")
    write_tone(inbox / "sub" / "b.wav", 0.2, freq=660.0)  # new: the scan hints it and waits for its job
    result = ask(settings.state_dir, {"command": "scan", "paths": [str(inbox / "sub")]})
    assert result["exit"] == 0 and result["problems"] == [], result
    assert (inbox / "sub" / "b.wav.analysis.json").exists()
    d.stop()
    assert retry(settings, [inbox / "sub"]) == 0  # done: nothing to retry, found without reading the rest


def test_scan_without_a_daemon_of_a_paused_folder_reads_only_its_jobs(
    tmp_path, inbox: Path, emulator: Emulator, no_whole_store
):
    """`watcher scan PATH` on its own, its folder paused: the files held are counted from the jobs under PATH."""
    from watcher.commands import scan
    from watcher.commands.manage import pause

    write_tone(inbox / "a.wav", 0.2)
    write_tone(inbox / "b.wav", 0.2, freq=550.0)
    settings = make_settings(tmp_path, inbox, emulator.url)
    pause(settings, inbox, paused=True)
    code, problems, promoted, paused = asyncio.run(scan(settings, [inbox / "a.wav"]))
    assert code == 1 and paused == {str(inbox): 1}, (code, problems, paused)
    assert [p["path"] for p in problems] == [str(inbox / "a.wav")] and promoted == 0
