"""A store of any size, filled in bulk: most jobs ended, some pending for later, a handful due (and a few of
those leased elsewhere), for the tests and the benchmark that show claims cost the due work, not the table.

Job ``i`` (1..n) belongs to file ``(i + 1) // 2``: odd jobs are ``archive``, even ones ``analyze``.
"""

from __future__ import annotations

from pathlib import Path

DUE_EVERY = 100_000  # jobs i with i % DUE_EVERY in (7, 8) are due: ~10 per pipeline per million
LEASED_EVERY = 250_000  # jobs i with i % LEASED_EVERY == 11 are due but leased by another node (archive)
LATER_EVERY = 100  # jobs i with i % LATER_EVERY == 3 are pending, due in an hour or more (polls, retries)
FOLDER = "/in"
FOLDER_ID = "folder-big"
ELSEWHERE = "elsewhere:1:1"

# The same rules for both databases; ``{now}`` is filled in, ``i`` and ``k`` are the series.
_PIPELINE = "CASE WHEN i % 2 = 1 THEN 'archive' ELSE 'analyze' END"
_DUE = f"i % {DUE_EVERY} IN (7, 8)"
_LEASED = f"i % {LEASED_EVERY} = 11"
_LATER = f"i % {LATER_EVERY} = 3"
_STEP = (
    "CASE WHEN i % 2 = 0 THEN 'analyze' "
    f"WHEN {_DUE} AND (i / {DUE_EVERY}) % 2 = 1 THEN 'upload' "
    f"WHEN {_DUE} OR {_LEASED} OR {_LATER} THEN 'process' ELSE 'fetch' END"
)
_STATE = f"CASE WHEN {_DUE} OR {_LEASED} OR {_LATER} THEN 'pending' ELSE 'done' END"
_NEXT = (
    f"CASE WHEN {_DUE} OR {_LEASED} THEN {{now}} - 60 + i / 1e6 WHEN {_LATER} THEN {{now}} + 3600 + i % 1000 ELSE 0 END"
)
_HOLDER = f"CASE WHEN {_LEASED} THEN '{ELSEWHERE}' END"
_UNTIL = f"CASE WHEN {_LEASED} THEN {{now}} + 600 END"


def due_count(n: int) -> dict[str, int]:
    """How many unleased jobs are due per pipeline in a store of ``n`` jobs."""
    due = [i for i in range(1, n + 1) if i % DUE_EVERY in (7, 8) and i % LEASED_EVERY != 11]
    return {"archive": sum(i % 2 for i in due), "analyze": sum(1 - i % 2 for i in due)}


def fill_sqlite(path: Path, n: int, now: float) -> None:
    """Create the store at ``path`` (migrated by the adapter) and add ``n`` jobs on ``n / 2`` files."""
    import sqlite3

    from watcher.store import Store

    Store(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN")
        db.execute(
            "WITH RECURSIVE s(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM s WHERE k < ?) "
            "INSERT INTO files (id, folder, path, rel_path, size, mtime_ns, inode, current, created_at) "
            f"SELECT k, '{FOLDER}', '{FOLDER}/f' || k || '.wav', 'f' || k || '.wav', 1000, k, k, 1, {now} FROM s",
            ((n + 1) // 2,),
        )
        db.execute(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?) "
            "INSERT INTO jobs (id, file_id, pipeline, step, state, next_attempt_at, lease_owner, lease_until, "
            "updated_at) "
            f"SELECT i, (i + 1) / 2, {_PIPELINE}, {_STEP}, {_STATE}, {_NEXT.format(now=now)}, {_HOLDER}, "
            f"{_UNTIL.format(now=now)}, {now} FROM s",
            (n,),
        )
        db.execute("COMMIT")  # no ANALYZE: a daemon's store has no statistics, its plans must not need them
    finally:
        db.close()


RECOUNT_POSTGRES = """
    DELETE FROM job_counts;
    INSERT INTO job_counts SELECT 0, j.pipeline, j.state, COUNT(*) FROM jobs j JOIN files f ON f.id=j.file_id
        WHERE f.current GROUP BY j.pipeline, j.state;
    DELETE FROM folder_counts;
    INSERT INTO folder_counts SELECT 0, folder_id, COUNT(*) FROM files WHERE current GROUP BY folder_id;
"""


def fill_postgres(url: str, n: int, now: float) -> None:
    """Create the store at ``url`` (migrated by the adapter) and add ``n`` jobs on ``n / 2`` files."""
    import psycopg

    from watcher.store.postgres import PostgresStore

    PostgresStore(url).close()
    with psycopg.connect(url, autocommit=True) as db:
        with db.transaction():
            db.execute("SET LOCAL session_replication_role = replica")  # a bulk fill: the counts are made once below
            db.execute(
                "INSERT INTO files (id, folder_id, rel_path, folder, path, size, mtime_ns, inode, current, created_at) "
                f"SELECT k, '{FOLDER_ID}', convert_to('f' || k || '.wav', 'UTF8'), convert_to('{FOLDER}', 'UTF8'), "
                f"convert_to('{FOLDER}/f' || k || '.wav', 'UTF8'), 1000, k, k, true, {now} "
                f"FROM generate_series(1, {(n + 1) // 2}) AS s(k)",  # no parameters: '%' is the modulo here
            )
            db.execute(
                "INSERT INTO jobs (id, file_id, pipeline, step, state, next_attempt_at, lease_owner, lease_until, "
                "updated_at) "
                f"SELECT i, (i + 1) / 2, {_PIPELINE}, {_STEP}, {_STATE}, {_NEXT.format(now=now)}, {_HOLDER}, "
                f"{_UNTIL.format(now=now)}, {now} FROM generate_series(1, {int(n)}) AS s(i)",
            )
            db.execute(RECOUNT_POSTGRES)
            for table in ("files", "jobs"):
                db.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT MAX(id) FROM {table}))")
        db.execute("VACUUM ANALYZE files")
        db.execute("VACUUM ANALYZE jobs")
