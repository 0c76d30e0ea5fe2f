"""What the daemon asks its store at every claim, poll and file costs the work due, not the size of the store.

A store of a million jobs (most ended, one in a hundred pending for later, a handful due, a few of those leased by
another node) beside one of a thousand: each statement the daemon's steady-state calls run is planned through an
index (SQLite: ``EXPLAIN QUERY PLAN``; PostgreSQL: ``EXPLAIN (ANALYZE, BUFFERS)``) with no full scan of a big
table, and the work done for a claim or a next-due (SQLite: virtual-machine steps; PostgreSQL: rows read and
buffers touched) stays as small in the big store as in the small one. Counts and plans only, never times.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.bigstore import FOLDER, FOLDER_ID, fill_postgres, fill_sqlite
from watcher.store import NewRevision, Operation, Store

BIG, SMALL = 1_000_000, 1_000
BIG_TABLES = ("jobs", "files", "operations", "ledger")
pytestmark = pytest.mark.timeout(600)

# The calls a worker makes at every turn: claims in both pipelines (the archive one reads both lanes) and next-due.
HOT: dict[str, Callable[[Any, float], Any]] = {
    "claim archive": lambda s, now: s.claim("archive", "me:1:1", now=now),
    "claim analyze": lambda s, now: s.claim("analyze", "me:1:1", now=now),
    "claim archive again": lambda s, now: s.claim("archive", "me:1:1", now=now),
    "next_due archive": lambda s, now: s.next_due("archive"),
    "next_due analyze": lambda s, now: s.next_due("analyze"),
}


def steady_state(store: Any, now: float) -> Iterator[tuple[str, Callable[[], Any]]]:
    """The other calls the daemon makes per file, per poll or per lease period, in a plausible order."""
    path = f"{FOLDER}/f77.wav"
    op = Operation("ab" * 32, "processing http://na account:1", "upload")
    yield "known_revision", lambda: store.known_revision(path, 1000, 77, 77)
    yield "current_revision", lambda: store.current_revision(path)
    # (another folder: reading all of this one, which holds every file, is the answer, not a cost to bound)
    yield "current_signatures", lambda: store.current_signatures("/other")
    yield "register a new file", lambda: store.register_revision(
        folder=FOLDER, path=f"{FOLDER}/new.wav", rel_path="new.wav", size=1, mtime_ns=1, inode=1,
        jobs=[("analyze", "analyze"), ("archive", "check")], now=now,
    )  # fmt: skip
    yield "register a new revision", lambda: store.register_revision(
        folder=FOLDER, path=path, rel_path="f77.wav", size=2000, mtime_ns=78, inode=77,
        jobs=[("analyze", "analyze"), ("archive", "check")], now=now,
    )  # fmt: skip
    yield "register several", lambda: store.register_revisions(
        [NewRevision(FOLDER, f"{FOLDER}/f{k}.wav", f"f{k}.wav", 3000, 79, k) for k in (78, 79, 80)],
        jobs=[("analyze", "analyze"), ("archive", "check")], now=now,
    )  # fmt: skip
    job = store.claim("archive", "me:1:1", now=now)
    assert job is not None
    yield "set_sha256", lambda: store.set_sha256(job.file.id, "ab" * 32)
    taken: list[Any] = []
    yield "gate_take", lambda: taken.extend(store.gate_take([op], "me:1:1", budget="processing", seconds=1.0))
    yield "gate_answered", lambda: store.gate_answered(op, "audio-1", fence=taken[0].fence)
    models = [Operation("cd" * 32, "analysis http://a account:1", f"analyze:m{i}", "", "reask") for i in range(3)]
    yield "gate_take of three models", lambda: store.gate_take(models, "me:1:1", budget="analysis", seconds=1.0)
    yield "ledger_ending", lambda: store.ledger_ending(1, "answered")
    yield "answered_operations", lambda: store.answered_operations(op.sha256, op.service)
    yield "commit", lambda: store.commit(job, step="process", audio_id="audio-1")
    yield "renew", lambda: store.renew([job.id], "me:1:1")
    yield "is_live", lambda: store.is_live(job)
    yield "release", lambda: store.release(job, next_attempt_at=now + 30)
    yield "get_job", lambda: store.get_job(job.id)
    yield "pending of some paths", lambda: store.pending(paths=[path])
    yield "jobs under a file and a folder", lambda: store.jobs_under([path, f"{FOLDER}/f7"])  # `scan PATH`'s poll
    yield "in_doubt_operations", lambda: store.in_doubt_operations()
    yield "gate_recover", lambda: store.gate_recover("me:1:1")
    yield "release_leases", lambda: store.release_leases("me:1:1")
    yield "prune", lambda: store.prune(30, now=now)
    yield "open_counts (the heartbeat)", lambda: store.open_counts()


# -- SQLite ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, Path], float]:
    now = time.time()
    paths = {}
    for n in (SMALL, BIG):
        paths[n] = tmp_path_factory.mktemp(f"store{n}") / "watcher.db"
        fill_sqlite(paths[n], n, now)
    return paths, now


def sqlite_plans(store: Store, call: Callable[[], Any]) -> list[tuple[str, list[str]]]:
    """Each statement ``call`` ran (with its values) and its query plan."""
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    try:
        call()
    finally:
        store._db.set_trace_callback(None)
    return [
        (sql, [row[3] for row in store._db.execute("EXPLAIN QUERY PLAN " + sql)])
        for sql in statements
        if sql.split(None, 1)[0].upper() in ("SELECT", "UPDATE", "DELETE", "INSERT")
    ]


def vm_steps(store: Store, call: Callable[[], Any]) -> int:
    """How many SQLite virtual-machine instructions ``call`` ran (a count of rows visited, and more)."""
    count = 0

    def tick() -> int:
        nonlocal count
        count += 1
        return 0

    store._db.set_progress_handler(tick, 1)
    try:
        call()
    finally:
        store._db.set_progress_handler(None, 1)
    return count


PARTIAL = re.compile(
    r"USING (COVERING )?INDEX (jobs_due_in_flight|jobs_due_new|jobs_due_first|jobs_by_owner|jobs_gone|files_replaced|"
    r"files_current|files_in_folder|files_by_key|files_by_bpm|files_by_sha256|jobs_finished|jobs_open_files|operations_sending|"
    r"operations_in_doubt|jobs_open)\b"
)  # partial indexes: a scan of one reads only the rows it names (pending, leased, replaced, in doubt...)


def full_scans(plan: list[str]) -> list[str]:
    """The plan's lines that read a whole big table (or a whole index of one) from end to end."""
    tables = "|".join(BIG_TABLES)
    return [line for line in plan if re.match(rf"SCAN ({tables}|j|f)\b", line) and not PARTIAL.search(line)]


def test_sqlite_claims_and_next_due_cost_the_due_jobs_not_the_table(sqlite_stores):
    """In a million-job store, claims and next-due read a lane's index head: as few steps as with a thousand jobs."""
    paths, now = sqlite_stores
    stores = {n: Store(p) for n, p in paths.items()}
    try:
        for name, call in HOT.items():
            steps = {n: vm_steps(s, partial(call, s, now)) for n, s in stores.items()}
            print(name, "virtual-machine steps:", steps)
            assert steps[BIG] < 2 * steps[SMALL] + 100, (name, steps)
            assert steps[BIG] < 1000, (name, steps)
            for sql, plan in sqlite_plans(stores[BIG], partial(call, stores[BIG], now)):
                assert not full_scans(plan), (name, sql, plan)
                assert not any("TEMP B-TREE" in line for line in plan), (name, sql, plan)  # read in index order
                if sql.startswith("SELECT") and "FROM jobs j" in sql:
                    assert any(re.match(r"SEARCH j USING INDEX jobs_due_(in_flight|new|first) \(pipeline=", line)
                               for line in plan), (name, plan)  # fmt: skip
    finally:
        for s in stores.values():
            s.close()


def test_sqlite_steady_state_queries_use_an_index(sqlite_stores):
    """Every statement the daemon runs per file, per poll or per lease period avoids a full scan of a big table."""
    paths, now = sqlite_stores
    store = Store(paths[BIG])
    try:
        for name, call in steady_state(store, now):
            for sql, plan in sqlite_plans(store, call):
                assert not full_scans(plan), (name, sql, plan)
        # How many jobs are pending (for `watcher scan`'s progress) counts the lanes' indexes, pending jobs only.
        for sql, plan in sqlite_plans(store, lambda: store.pending()):
            assert all(re.match(r"SCAN j USING (COVERING )?INDEX jobs_due_", line) for line in plan), (sql, plan)
        # Every partial index is one the plans above may scan.
        partial_indexes = store._db.execute("SELECT name FROM sqlite_master WHERE type='index' AND sql LIKE '%WHERE%'")
        assert all(PARTIAL.search(f"USING INDEX {name}") for (name,) in partial_indexes)
    finally:
        store.close()


def test_sqlite_jobs_under_a_path_cost_the_files_there_not_the_store(sqlite_stores):
    """`scan PATH` polls the jobs under its paths: as few steps in a million-job store as in a thousand."""
    paths, _ = sqlite_stores
    stores = {n: Store(p) for n, p in paths.items()}
    try:
        call = {n: partial(s.jobs_under, [f"{FOLDER}/f77.wav", f"{FOLDER}/f7"]) for n, s in stores.items()}
        steps = {n: vm_steps(s, call[n]) for n, s in stores.items()}
        print("jobs_under virtual-machine steps:", steps)
        assert len(call[BIG]()) == 2 and steps[BIG] < 2 * steps[SMALL] + 100, steps
    finally:
        for s in stores.values():
            s.close()


# -- PostgreSQL ------------------------------------------------------------------------------------------------


@contextmanager
def recording() -> Iterator[list[tuple[Any, Any]]]:
    """Every statement any psycopg cursor of this process runs meanwhile, with its parameters (whichever pooled
    connection the store's call takes, made before or after)."""
    log: list[tuple[Any, Any]] = []
    execute = psycopg.Cursor.execute

    def kept(self: psycopg.Cursor[Any], query: Any, params: Any = None, **kwargs: Any) -> Any:
        log.append((query, params))
        return execute(self, query, params, **kwargs)

    psycopg.Cursor.execute = kept  # type: ignore[method-assign]
    try:
        yield log
    finally:
        psycopg.Cursor.execute = execute  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def pg_stores(pg_cluster: Any) -> tuple[dict[int, str], float]:
    now = time.time()
    urls = {}
    for n in (SMALL, BIG):
        urls[n] = pg_cluster.database()
        fill_postgres(urls[n], n, now)
    return urls, now


def open_pg(url: str) -> Any:
    from watcher.store.postgres import PostgresStore

    store = PostgresStore(url)
    store.use_folders({FOLDER: FOLDER_ID})
    return store


def pg_plans(url: str, store: Any, call: Callable[[], Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each statement ``call`` ran and its plan as run again (``EXPLAIN ANALYZE``, rolled back), as JSON."""
    with recording() as log:
        call()
    ran = [(str(q), p) for q, p in log if str(q).split(None, 1)[0].upper() in ("SELECT", "UPDATE", "DELETE")]
    out = []
    with psycopg.connect(url) as conn:
        for sql, params in ran:
            if "clock_timestamp()" in sql or "FROM meta" in sql:
                continue
            (plan,) = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params).fetchone()  # type: ignore[misc]
            conn.rollback()
            out.append((sql, plan[0]))
    return out


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def seq_scans(plan: dict[str, Any]) -> list[str]:
    return [
        n["Relation Name"]
        for n in nodes(plan["Plan"])
        if n["Node Type"] == "Seq Scan" and n.get("Relation Name") in BIG_TABLES
    ]


def rows_read(plan: dict[str, Any], table: str) -> int:
    """Rows the plan's scans of ``table`` read: those kept and those its filters removed, over every loop."""
    return sum(
        (n.get("Actual Rows", 0) + n.get("Rows Removed by Filter", 0) + n.get("Rows Removed by Index Recheck", 0))
        * n.get("Actual Loops", 1)
        for n in nodes(plan["Plan"])
        if n.get("Relation Name") == table
    )


def buffers(plan: dict[str, Any]) -> int:
    top = plan["Plan"]
    return int(top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0))


def test_postgres_claims_and_next_due_cost_the_due_jobs_not_the_table(pg_stores):
    """In a million-job store, claims and next-due read a few index entries and pages, as with a thousand jobs."""
    urls, now = pg_stores
    stores = {n: open_pg(url) for n, url in urls.items()}
    try:
        for name, call in HOT.items():
            seen: dict[int, tuple[int, int]] = {}
            for n, store in stores.items():
                plans = pg_plans(urls[n], store, partial(call, store, now))
                assert plans, name
                for sql, plan in plans:
                    assert n == SMALL or not seq_scans(plan), (name, sql, plan)  # small tables: any plan is cheap
                seen[n] = (sum(rows_read(p, "jobs") for _, p in plans), sum(buffers(p) for _, p in plans))
            print(name, "rows of jobs read, pages touched:", seen)
            # Rows of jobs read: the due ones (and the leased ones passed over), as in the small store; pages
            # touched: a few index levels and rows (the jobs table alone fills thousands of pages).
            assert seen[BIG][0] <= min(20, seen[SMALL][0] + 10), (name, seen)
            assert seen[BIG][1] <= 100, (name, seen)
    finally:
        for s in stores.values():
            s.close()


def test_postgres_steady_state_queries_use_an_index(pg_stores):
    """Every statement the daemon runs per file, per poll or per lease period avoids a full scan of a big table."""
    urls, now = pg_stores
    store = open_pg(urls[BIG])
    try:
        for name, call in steady_state(store, now):
            for sql, plan in pg_plans(urls[BIG], store, call):
                scanned = seq_scans(plan)
                if name.startswith("open_counts"):
                    # Its jobs come through jobs_open; with 10,000 of them open, PostgreSQL rightly reads files in
                    # one pass rather than look each one up: a cost of the files, never of the finished jobs.
                    scanned = [t for t in scanned if t != "files"]
                assert not scanned, (name, sql, plan)
    finally:
        store.close()


def test_postgres_jobs_under_a_path_read_the_files_there_not_the_store(pg_stores):
    """`scan PATH` polls the jobs under its paths: a few rows of files and jobs read, in a million-job store."""
    urls, _ = pg_stores
    store = open_pg(urls[BIG])
    try:
        plans = pg_plans(urls[BIG], store, partial(store.jobs_under, [f"{FOLDER}/f77.wav", f"{FOLDER}/f7"]))
        read = {t: sum(rows_read(p, t) for _, p in plans) for t in ("files", "jobs")}
        indexes = {n.get("Index Name") for _, p in plans for n in nodes(p["Plan"])} - {None}
        print("jobs_under rows read:", read, "indexes:", sorted(indexes))
        assert {"files_current", "files_by_path"} <= indexes, indexes  # this node's folder, and the others'
        assert not any(seq_scans(p) for _, p in plans) and read["files"] <= 10 and read["jobs"] <= 10, read
    finally:
        store.close()
