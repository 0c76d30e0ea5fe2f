"""The store: file versions, leases, scheduling, the result cache, and durability across reopenings."""

from __future__ import annotations

import sqlite3

import pytest

from watcher.store import Store, StoredResult


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "w.db")
    yield s
    s.close()


def register(store: Store, path: str = "/in/a.wav", size: int = 10, mtime: int = 1, inode: int = 7):
    return store.register_version(
        folder="/in",
        path=path,
        rel_path=path.rsplit("/", 1)[1],
        size=size,
        mtime_ns=mtime,
        inode=inode,
        jobs=[("analyze", "pending")],
        now=100.0,
    )


def test_same_version_registers_once(store):
    """Registering an identical version twice creates one row and one job."""
    assert register(store)[1] is True
    assert register(store)[1] is False
    assert store.counts() == {"analyze": {"pending": 1}}


def test_new_version_supersedes_unfinished_work(store):
    """A changed file becomes the current version; the old version's pending job is superseded."""
    register(store)
    register(store, size=20, mtime=2)
    current = store.current_version("/in/a.wav")
    assert current is not None and current.size == 20
    stages = [r[0] for r in store._db.execute("SELECT stage FROM jobs ORDER BY id")]
    assert stages == ["superseded", "pending"]


def test_claim_leases_and_release_schedules(store):
    """A claimed job is invisible to other claimers until released; a release with a time schedules it."""
    register(store)
    job = store.claim("analyze", "a", now=200.0)
    assert job is not None and job.file.path == "/in/a.wav"
    assert store.claim("analyze", "b", now=200.0) is None
    store.release(job, next_attempt_at=500.0, error="boom", error_kind="retry_later", count_attempt=True)
    assert store.claim("analyze", "b", now=499.0) is None
    assert store.next_due("analyze") == 500.0
    again = store.claim("analyze", "b", now=500.0)
    assert again is not None and again.attempts == 1 and again.last_error == "boom"


def test_expired_lease_can_be_claimed(store):
    """A lease that ran out (its holder died) lets another worker take the job."""
    register(store)
    assert store.claim("analyze", "dead", lease=10, now=200.0) is not None
    assert store.claim("analyze", "alive", now=205.0) is None
    assert store.claim("analyze", "alive", now=211.0) is not None


def test_commit_is_durable(tmp_path):
    """Data committed on a job survives closing and reopening the store (a restart)."""
    s = Store(tmp_path / "w.db")
    register(s)
    job = s.claim("analyze", "a")
    s.commit(job, stage="uploading", audio_id="abc")
    s.close()
    s2 = Store(tmp_path / "w.db")
    s2.release_leases()
    job2 = s2.claim("analyze", "b")
    assert job2 is not None and job2.stage == "uploading" and job2.data["audio_id"] == "abc"
    s2.close()


def test_results_are_content_addressed(store):
    """Results are found by sha256 and backend, whatever file they came from."""
    r = StoredResult("key", "key", "1", "cid", {"key": ["C"]})
    store.save_result("ab" * 32, "remote", r)
    assert store.results_for("ab" * 32, "remote") == {"key": r}
    assert store.results_for("ab" * 32, "local") == {}


def test_retry_resets_failed_jobs(store):
    """`retry --failed` makes failed jobs due again from the stage they failed in."""
    register(store)
    job = store.claim("analyze", "a")
    job.data["failed_in"] = "pending"
    store.release(job, stage="failed", error="bad", error_kind="bad_input")
    assert [p.error for p in store.problems()] == ["bad"]
    assert store.retry(failed=True, restart_stage={"analyze": "pending"}) == 1
    assert store.counts() == {"analyze": {"pending": 1}}
    assert store.problems() == []


def test_wal_mode(store):
    """The store runs in WAL mode, so status readers never block the daemon."""
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other = sqlite3.connect(store.path)
    assert other.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
    other.close()
