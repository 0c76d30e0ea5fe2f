"""The counts the store keeps as rows change (every adapter): after registrations, claims, commits, releases,
supersessions, retries, back-fills, reopenings and pruning they equal a recount of the jobs; the file list's
pages and one file's lookup read the same store through indexes."""

from __future__ import annotations

import threading
from typing import Any

from watcher.store import FileQuery, NewRevision, StoredResult


def recount(store: Any) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """The counts read from every job and file (what the kept counts must equal)."""
    jobs = (
        "SELECT j.pipeline, j.state, COUNT(*) AS n FROM jobs j JOIN files f ON f.id=j.file_id "
        "WHERE f.current{} GROUP BY j.pipeline, j.state"
    )
    if hasattr(store, "_all"):  # PostgreSQL
        rows = [(r["pipeline"], r["state"], r["n"]) for r in store._all(jobs.format(""))]
        folders = {
            r["folder_id"]: int(r["n"])
            for r in store._all("SELECT folder_id, COUNT(*) AS n FROM files WHERE current GROUP BY folder_id")
        }
    else:
        rows = [tuple(r) for r in store._db.execute(jobs.format("=1"))]
        folders = {
            r[0]: r[1] for r in store._db.execute("SELECT folder, COUNT(*) FROM files WHERE current=1 GROUP BY 1")
        }
    out: dict[str, dict[str, int]] = {}
    for pipeline, state, n in sorted(rows):
        out.setdefault(pipeline, {})[state] = int(n)
    return out, folders


def agrees(store: Any) -> dict[str, dict[str, int]]:
    """Assert the kept counts equal a recount; return them."""
    counts, folders = recount(store)
    assert store.counts() == counts
    assert store.folder_counts() == folders
    assert store.open_counts() == {
        p: {s: n for s, n in states.items() if s in ("pending", "in_doubt", "failed")} for p, states in counts.items()
    }
    return counts


def revision(n: int, folder: str = "/in", size: int = 1) -> NewRevision:
    return NewRevision(folder, f"{folder}/{n}.wav", f"{n}.wav", size, 1, n)


JOBS = [("analyze", "analyze"), ("archive", "check")]


def test_counts_follow_every_change_of_a_job(store):
    """Each way a job's state or a file's currency changes keeps the counts equal to a recount."""
    store.register_revisions([revision(n) for n in range(6)] + [revision(n, "/other") for n in range(3)], jobs=JOBS)
    assert agrees(store) == {"analyze": {"pending": 9}, "archive": {"pending": 9}}
    a = store.claim("analyze", "me")
    b = store.claim("analyze", "me")
    c = store.claim("archive", "me")
    agrees(store)  # a claim changes no state
    store.commit(a, step="analyze", sidecar="/in/x.json")
    store.release(a, state="done")
    store.release(b, state="failed", error="not audio", error_code="bad_input")
    c.data["in_doubt"] = {"operation": "upload", "since": 1.0, "keys": []}
    store.release(c, state="in_doubt", error="answer lost", error_code="in_doubt")
    agrees(store)
    store.register_revisions([revision(0, size=2), revision(1, size=2)], jobs=JOBS)  # supersedes the old revisions
    counts = agrees(store)
    assert sum(counts["analyze"].values()) == 9  # one job per current revision
    assert store.retry(failed=True, in_doubt=True) >= 0
    agrees(store)
    d = store.claim("analyze", "me")
    store.release(d, state="done")
    assert store.reopen([d.id], "analyze") == 1
    agrees(store)
    e = store.claim("archive", "me")
    store.release(e, state="gone")
    store.prune(0, now=2e10)
    agrees(store)


def test_counts_stay_equal_under_concurrent_writers(open_store):
    """Four threads on their own store connections register, claim and release at once: no update is lost."""
    first = open_store()
    stores = [first] + [open_store() for _ in range(3)]

    def work(store: Any, k: int) -> None:
        for n in range(10):
            store.register_revisions([revision(k * 100 + n)], jobs=JOBS)
            job = store.claim("analyze", f"w{k}")
            if job is not None:
                store.release(job, state="done" if n % 2 else "failed")

    threads = [threading.Thread(target=work, args=(s, k)) for k, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    counts = agrees(first)
    assert sum(counts["analyze"].values()) == 40


def test_file_pages_filter_by_folder_key_tempo_and_state(store):
    """Pages come in path order with their total; key and tempo come from the stored results."""
    store.register_revisions([revision(n) for n in range(7)] + [revision(n, "/other") for n in range(2)], jobs=JOBS)
    job = store.claim("analyze", "me")
    store.set_sha256(job.file.id, "ab" * 32)
    store.save_result("ab" * 32, "remote", StoredResult("key", "key", "1", None, {"key": ["F#"], "scale": ["minor"]}))
    store.save_result("ab" * 32, "remote", StoredResult("bpm_degara", "bpm_degara", "1", None, {"bpm": 128.2}))
    store.release(job, state="failed", error="x", error_code="bad_input")
    rows, total, capped = store.list_files(FileQuery.of({}, size=4))
    assert (total, capped) == (9, False) and [r.file.path for r in rows] == [
        "/in/0.wav",
        "/in/1.wav",
        "/in/2.wav",
        "/in/3.wav",
    ]
    rows, total, _ = store.list_files(FileQuery.of({"page": "3"}, size=4))
    assert total == 9 and [r.file.path for r in rows] == ["/other/1.wav"]
    assert store.list_files(FileQuery.of({"folder": "/other/"}))[1] == 2
    for ask in ({"key": "f# minor"}, {"key": "F#"}, {"bpm_min": "128", "bpm_max": "129"}, {"state": "failed"}):
        rows, total, _ = store.list_files(FileQuery.of(ask))
        assert total == 1 and [r.file.path for r in rows] == [job.file.path], ask
        assert (rows[0].key, rows[0].scale, rows[0].bpm) == ("F#", "minor", 128.2)
    assert store.list_files(FileQuery.of({"key": "A minor"}))[1] == 0
    assert store.list_files(FileQuery.of({"q": "6.wav"}))[1] == 1
    found = store.listed(job.file.path)
    assert found is not None and {j.pipeline: j.state for j in found.jobs} == {
        "analyze": "failed",
        "archive": "pending",
    }
    assert store.listed("/in/nothing.wav") is None
    assert store.finished_since(0)["analyze"] == 1


def test_a_version_10_sqlite_store_gets_its_counts_and_tags(tmp_path):
    """Migration 11 counts the jobs already there and copies key and tempo from the results already stored."""
    import json
    import sqlite3

    from watcher.store import Store
    from watcher.store.sqlite.schema import SCHEMA, statements

    db = sqlite3.connect(tmp_path / "w.db")
    for script in SCHEMA[:10]:
        for statement in statements(script):
            db.execute(statement)
    db.execute(
        "INSERT INTO files (folder, path, rel_path, size, mtime_ns, inode, sha256, current, created_at) "
        "VALUES ('/in', '/in/a.wav', 'a.wav', 1, 1, 1, 'ab', 1, 0), ('/in', '/in/a.wav', 'a.wav', 2, 1, 1, NULL, 0, 0)"
    )
    db.execute(
        "INSERT INTO jobs (file_id, pipeline, step, state, next_attempt_at, updated_at) VALUES "
        "(1, 'analyze', 'analyze', 'done', 0, 0), (2, 'analyze', 'analyze', 'superseded', 0, 0)"
    )
    db.execute(
        "INSERT INTO results VALUES ('ab', 'remote', 'key', 'key', '1', NULL, ?, 0)",
        (json.dumps({"key": "Eb", "scale": "major"}),),
    )
    db.execute("PRAGMA user_version = 10")
    db.commit()
    db.close()
    store = Store(tmp_path / "w.db")
    try:
        assert agrees(store) == {"analyze": {"done": 1}}
        (row,), _, _ = store.list_files(FileQuery.of({"key": "eb major"}))
        assert row.file.path == "/in/a.wav" and (row.key, row.scale) == ("Eb", "major")
    finally:
        store.close()


def test_a_version_6_postgres_store_gets_its_counts(pg_url):
    """Migration 7 on PostgreSQL counts the jobs already there into slot rows a recount agrees with."""
    import psycopg

    from watcher.store.postgres import PostgresStore
    from watcher.store.postgres.schema import SCHEMA

    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("CREATE TABLE schema_version (version integer NOT NULL); INSERT INTO schema_version VALUES (6)")
        for script in SCHEMA[:6]:
            db.execute(script)
        db.execute(
            "INSERT INTO files (id, folder_id, rel_path, folder, path, size, mtime_ns, inode, current, created_at) "
            "VALUES (1, 'F', 'a.wav', '/in', '/in/a.wav', 1, 1, 1, true, 0), "
            "(2, 'F', 'b.wav', '/in', '/in/b.wav', 1, 1, 2, false, 0)"
        )
        db.execute(
            "INSERT INTO jobs (file_id, pipeline, step, state, next_attempt_at, updated_at) VALUES "
            "(1, 'archive', 'check', 'failed', 0, 0), (2, 'archive', 'check', 'superseded', 0, 0)"
        )
    store = PostgresStore(pg_url)
    try:
        assert agrees(store) == {"archive": {"failed": 1}}
    finally:
        store.close()
