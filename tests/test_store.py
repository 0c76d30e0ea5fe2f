"""The store's contract (every adapter): revisions, leases, scheduling, the result cache, durability across
reopenings, and the SQLite adapter's own promises (WAL, migrations from earlier releases)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from watcher.store import NewRevision, State, Store, StoredResult, utc_day


def register(store: Store, path: str = "/in/a.wav", size: int = 10, mtime: int = 1, inode: int = 7):
    return store.register_revision(
        folder="/in",
        path=path,
        rel_path=path.removeprefix("/in/"),
        size=size,
        mtime_ns=mtime,
        inode=inode,
        jobs=[("analyze", "analyze")],
        now=100.0,
    )


def test_same_revision_registers_once(store):
    """Registering an identical revision twice creates one row and one job."""
    assert register(store)[1] is True
    assert register(store)[1] is False
    assert store.counts() == {"analyze": {"pending": 1}}


def test_new_revision_supersedes_unfinished_work(store):
    """A changed file becomes the current revision; the old revision's pending job is superseded."""
    register(store)
    register(store, size=20, mtime=2)
    current = store.current_revision("/in/a.wav")
    assert current is not None and current.size == 20
    old_id, new_id = current.id - 1, current.id
    assert [j.state for j in store.jobs_of_file(old_id)] == ["superseded"]
    assert [(j.state, j.step) for j in store.jobs_of_file(new_id)] == [("pending", "analyze")]


def test_revisions_registered_together_keep_the_one_by_one_rules(store):
    """register_revisions: each revision as register_revision would (supersession, one job per pipeline, a known
    revision not again), answers in order."""
    old_id, _ = register(store, "/in/a.wav")
    known_id, _ = register(store, "/in/c.wav")
    jobs = [("analyze", "analyze"), ("archive", "check")]
    answers = store.register_revisions(
        [
            NewRevision("/in", "/in/a.wav", "a.wav", 20, 2, 7),  # a new revision of a.wav
            NewRevision("/in", "/in/b.wav", "b.wav", 5, 1, 8),
            NewRevision("/in", "/in/c.wav", "c.wav", 10, 1, 7),  # already known
        ],
        jobs=jobs,
        now=200.0,
    )
    assert [new for _, new in answers] == [True, True, False]
    assert answers[2][0] == known_id
    assert [j.state for j in store.jobs_of_file(old_id)] == ["superseded"]
    for (file_id, _), path in zip(answers[:2], ("/in/a.wav", "/in/b.wav"), strict=True):
        current = store.current_revision(path)
        assert current is not None and current.id == file_id
        assert sorted((j.pipeline, j.step, j.state) for j in store.jobs_of_file(file_id)) == [
            ("analyze", "analyze", "pending"),
            ("archive", "check", "pending"),
        ]
    assert store.counts() == {"analyze": {"pending": 3}, "archive": {"pending": 2}}  # current revisions only


def test_revisions_registered_together_are_all_or_none(store):
    """One transaction: a revision the database refuses leaves none of its batch recorded."""
    register(store, "/in/a.wav")
    with pytest.raises(Exception):  # noqa: B017 - each database names an out-of-range integer its own way
        store.register_revisions(
            [NewRevision("/in", "/in/b.wav", "b.wav", 5, 1, 8), NewRevision("/in", "/in/c.wav", "c.wav", 2**70, 1, 9)],
            jobs=[("analyze", "analyze")],
        )
    assert store.current_revision("/in/b.wav") is None
    assert store.counts() == {"analyze": {"pending": 1}}
    assert [new for _, new in store.register_revisions([], jobs=[("analyze", "analyze")])] == []


def test_a_folders_current_revisions_come_in_one_answer(store):
    """current_signatures gives each current revision of one folder (not replaced ones, not other folders')."""
    register(store, "/in/a.wav", size=10, mtime=1, inode=7)
    register(store, "/in/a.wav", size=20, mtime=2, inode=7)  # replaces the first
    register(store, "/in/sub/b.wav", size=30, mtime=3, inode=8)
    store.register_revision(
        folder="/other", path="/other/c.wav", rel_path="c.wav", size=1, mtime_ns=1, inode=1, jobs=[]
    )
    found = store.current_signatures("/in")  # grouped by the folder each is in, as a walk lists them
    assert {d: {n: sig[:2] for n, sig in names.items()} for d, names in found.items()} == {
        "/in": {"a.wav": (20, 2)},
        "/in/sub": {"b.wav": (30, 3)},
    }
    assert found["/in/sub"]["b.wav"][2] in (8, None)  # None: an adapter shared across mounts does not compare it
    assert store.current_signatures("/nowhere") == {}


def test_open_counts_are_the_counts_of_the_states_still_open(store):
    """open_counts (the heartbeat's) equals counts for pending, in_doubt and failed, and leaves the rest out."""
    for n in range(5):
        register(store, f"/in/{n}.wav", inode=n)
    register(store, "/in/0.wav", size=99, mtime=9, inode=0)  # replaces 0.wav: its first job is not counted
    for state in ("done", "failed", "skipped", "in_doubt"):  # four of the five current jobs end; one stays pending
        claimed = store.claim("analyze", "me", now=time.time() + 1)
        assert claimed is not None
        store.release(claimed, state=state)
    everything = store.counts()
    opened = store.open_counts()
    still_open = ("pending", "in_doubt", "failed")
    assert opened == {p: {s: n for s, n in by.items() if s in still_open} for p, by in everything.items()}
    assert sum(opened["analyze"].values()) == 3 and "done" not in opened["analyze"]


def test_claim_leases_and_release_schedules(store):
    """A claimed job is invisible to other claimers until released; a release with a time schedules it."""
    register(store)
    job = store.claim("analyze", "a", now=200.0)
    assert job is not None and job.file.path == "/in/a.wav"
    assert store.claim("analyze", "b", now=200.0) is None
    store.release(job, next_attempt_at=500.0, error="boom", error_code="retry_later", count_attempt=True)
    assert store.claim("analyze", "b", now=499.0) is None
    assert store.next_due("analyze") == pytest.approx(500.0, abs=0.5)  # PostgreSQL: a delay, as this clock reads
    again = store.claim("analyze", "b", now=501.0)
    assert again is not None and again.attempts == 1 and again.last_error == "boom"


def test_expired_lease_can_be_claimed(store):
    """A lease that ran out (its holder died) lets another worker take the job."""
    register(store)
    assert store.claim("analyze", "dead", lease=10, now=200.0) is not None
    assert store.claim("analyze", "alive", now=205.0) is None
    assert store.claim("analyze", "alive", now=211.0) is not None


def test_commit_is_durable(open_store):
    """Data committed on a job survives closing and reopening the store (a restart)."""
    s = open_store()
    register(s)
    job = s.claim("analyze", "a")
    s.commit(job, step="uploading", audio_id="abc")
    s.close()
    s2 = open_store()
    s2.release_leases()
    job2 = s2.claim("analyze", "b")
    assert job2 is not None and job2.step == "uploading" and job2.data["audio_id"] == "abc"


def test_results_are_content_addressed(store):
    """Results are found by sha256 and backend, whatever file they came from."""
    r = StoredResult("key", "key", "1", "cid", {"key": ["C"]})
    store.save_result("ab" * 32, "remote", r)
    assert store.results_for("ab" * 32, "remote") == {"key": r}
    assert store.results_for("ab" * 32, "local") == {}


def test_retry_resets_failed_jobs_at_their_step(store):
    """`retry --failed` makes failed jobs due again at the step they failed at."""
    register(store)
    job = store.claim("analyze", "a")
    store.commit(job, step="upload")
    store.release(job, state="failed", error="bad", error_code="bad_input")
    (problem,) = store.problems()
    assert (problem.error, problem.state, problem.step) == ("bad", "failed", "upload")
    assert store.retry(failed=True) == 1
    assert store.counts() == {"analyze": {"pending": 1}}
    assert store.problems() == []
    again = store.claim("analyze", "b")
    assert again is not None and again.step == "upload" and again.attempts == 0


def test_retry_failed_takes_jobs_waiting_on_a_paused_service_only(store):
    """`retry --failed` also takes a job waiting after a refused key (needs_user), not one backing off, and a
    service's resumption takes only its own pipelines' jobs."""
    register(store, "/in/a.wav")
    register(store, "/in/b.wav", inode=8)
    a = store.claim("analyze", "w")
    b = store.claim("analyze", "w")
    store.release(a, next_attempt_at=10**10, error="key refused", error_code="needs_user")
    store.release(b, next_attempt_at=10**10, error="503", error_code="retry_later")
    assert store.retry(waiting_on_service=True, pipelines=["archive"]) == 0
    assert store.retry(failed=True, waiting_on_service=True) == 1
    again = store.claim("analyze", "w")
    assert again is not None and again.file.path == a.file.path and store.claim("analyze", "w") is None


def test_a_retrys_sql_narrowing_takes_exactly_what_its_rule_takes():
    """Each store reads only the rows a retry takes (the SQL condition of RetryAsk.narrowing): for every ask and
    every open job (state, error code, pipeline), the condition selects it exactly when the rule takes it."""
    import itertools
    import sqlite3

    from watcher.store.models import RetryAsk

    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE j (state TEXT, error_code TEXT, pipeline TEXT)")
    rows = list(itertools.product(("pending", "failed", "in_doubt"), (None, "needs_user", "retry_later"),
                                  ("analyze", "archive")))  # fmt: skip
    db.executemany("INSERT INTO j VALUES (?, ?, ?)", rows)
    for flags in itertools.product((False, True), repeat=4):
        for pipelines in (None, [], ["archive"], ["analyze", "archive"]):
            ask = RetryAsk(*flags, pipelines=pipelines)
            narrow, args = ask.narrowing("?")
            found = db.execute(f"SELECT state, error_code, pipeline FROM j WHERE 1=1{narrow}", args).fetchall()
            assert sorted(found, key=str) == sorted([r for r in rows if ask.takes(*r)], key=str), (flags, pipelines)


def test_backfill_adds_missing_jobs_and_reopens_done_ones(store):
    """A back-fill adds a pipeline's job to revisions without one (once) and reopens done jobs at a step."""
    (file_id, _) = register(store)
    job = store.claim("analyze", "w")
    store.release(job, state="done")
    assert store.add_jobs([file_id], "archive", "check") == 1
    assert store.add_jobs([file_id], "archive", "check") == 0
    assert store.counts() == {"analyze": {"done": 1}, "archive": {"pending": 1}}
    assert store.reopen([job.id], "analyze") == 1
    assert store.reopen([job.id], "analyze") == 0  # only a done job is reopened
    again = store.claim("analyze", "w")
    assert again is not None and again.id == job.id and again.step == "analyze"


def test_wal_mode_lets_readers_in_while_a_writer_works(tmp_path):
    """The store runs in WAL mode: a read-only reader (status) sees committed rows while the daemon writes."""
    store = Store(tmp_path / "w.db")
    register(store)
    assert (tmp_path / "w.db-wal").exists()
    reader = Store(tmp_path / "w.db", readonly=True)
    try:
        job = store.claim("analyze", "a")
        assert reader.counts() == {"analyze": {"pending": 1}}
        store.release(job, state="done")
        assert reader.counts() == {"analyze": {"done": 1}}
    finally:
        reader.close()
        store.close()


def test_a_store_from_the_previous_release_is_migrated(tmp_path):
    """A version-3 store (stages, error kinds, a remote-ID table) upgrades with nothing lost and nothing re-paid."""
    from watcher.store.sqlite.schema import SCHEMA

    db = sqlite3.connect(tmp_path / "w.db")
    for script in SCHEMA[:3]:
        db.executescript(script)
    db.executescript(
        """
        PRAGMA user_version = 3;
        INSERT INTO files VALUES (1, '/in', '/in/a.wav', 'a.wav', 10, 1, 7, 'ab', 1, 0);
        INSERT INTO jobs (id, file_id, kind, stage, attempts, next_attempt_at, error_kind, last_error, data, updated_at)
            VALUES (1, 1, 'archive', 'failed', 8, 0, 'retry_later', 'boom', '{"failed_in": "process"}', 0),
                   (2, 1, 'analyze', 'pending', 0, 0, NULL, NULL, '{}', 0);
        INSERT INTO remote VALUES ('ab', 'neuralanalog', 'audio', 'k1', 'audio-1', 'complete', NULL, 0, 0);
        INSERT INTO results VALUES ('ab', 'remote', 'key', 'key', '1', NULL, '{"key": ["C"]}', 0);
        """
    )
    db.close()
    store = Store(tmp_path / "w.db")
    try:
        jobs = {j.pipeline: j for j in store.jobs_of_file(1)}
        assert (jobs["archive"].state, jobs["archive"].step, jobs["archive"].error_code) == (
            "failed",
            "process",
            "retry_later",
        )
        assert (jobs["analyze"].state, jobs["analyze"].step) == ("pending", "analyze")
        where = "processing http://na account:1"
        assert store.adopt_legacy("neuralanalog", where) == 1
        assert store.adopt_legacy("remote", "analysis http://es account:2") == 1
        assert store.answered_operations("ab", where) == {"upload"}
        assert set(store.results_for("ab", "analysis http://es account:2")) == {"key"}
    finally:
        store.close()


def test_the_sqlite_adapter_offers_every_port(store):
    """The adapter satisfies the whole contract a composition root may rely on (checked method by method)."""
    import inspect

    from watcher.store import ports

    for port in (ports.Registry, ports.Jobs, ports.Results, ports.Gate, ports.Control, ports.StorePort):
        for name, member in inspect.getmembers(port, inspect.isfunction):
            if name.startswith("_"):
                continue
            mine = getattr(store, name, None)
            assert callable(mine), f"{type(store).__name__} lacks {port.__name__}.{name}"
            wanted = [p for p in inspect.signature(member).parameters if p != "self"]
            assert [p for p in inspect.signature(mine).parameters] == wanted, f"{name} differs from the port"


def test_an_error_quoting_a_name_that_is_not_utf8_is_stored(store):
    """A message naming a Latin-1 file (or any text with undecodable bytes) never makes a release fail."""
    import os

    register(store)
    job = store.claim("analyze", "a")
    message = f"delivered to {os.fsdecode(b'/out/caf' + bytes([0xE9]))}"
    store.release(job, state="done", error=message)
    (done,) = store.jobs_of_current()
    assert done.state == "done" and done.last_error == "delivered to /out/caf\\xe9"


def _archive_jobs(store: Store, step: str, count: int, *, at: float, start: int = 0) -> None:
    """``count`` archive jobs standing at ``step``, due at ``at`` (one file each)."""
    for n in range(start, start + count):
        store.register_revision(
            folder="/in", path=f"/in/{step}{n}.wav", rel_path=f"{step}{n}.wav", size=10, mtime_ns=1, inode=n,
            jobs=[("archive", step)], now=at,
        )  # fmt: skip


def test_due_polls_go_first_but_new_uploads_get_a_bounded_share(store):
    """With two thousand polls due (and due earlier), new uploads still get one claim in every IN_FLIGHT_RUN + 1."""
    from watcher.store.lanes import IN_FLIGHT_RUN

    _archive_jobs(store, "process", 2000, at=100.0)
    _archive_jobs(store, "check", 20, at=150.0)
    claimed = [store.claim("archive", "w", now=1000.0) for _ in range(120)]
    steps = "".join("n" if job is not None and job.step == "check" else "p" for job in claimed)
    assert None not in claimed
    assert steps[: IN_FLIGHT_RUN + 1] == "p" * IN_FLIGHT_RUN + "n"  # polls first, then the uploads' turn
    assert steps.count("n") == 20  # every upload was claimed within the first 20 turns ...
    assert "p" * (IN_FLIGHT_RUN + 1) not in steps[: steps.rindex("n")]  # ... never behind more than the run
    assert steps[20 * (IN_FLIGHT_RUN + 1) :] == "p" * (120 - 20 * (IN_FLIGHT_RUN + 1))  # then polls again


def test_a_due_poll_or_delivery_is_claimed_before_thousands_of_due_uploads(store):
    """With two thousand new uploads due (and due earlier), a poll or delivery that falls due is the next claim."""
    _archive_jobs(store, "check", 2000, at=100.0)
    for _ in range(10):  # uploads are being served
        job = store.claim("archive", "w", now=1000.0)
        assert job is not None and job.step == "check"
    _archive_jobs(store, "process", 1, at=900.0)
    _archive_jobs(store, "fetch", 1, at=950.0)
    assert [store.claim("archive", "w", now=1000.0).step for _ in range(3)] == ["process", "fetch", "check"]
    assert store.next_due("archive") == pytest.approx(100.0, abs=0.5)  # the uploads still waiting


def test_a_pipeline_with_one_lane_is_claimed_oldest_first(store):
    """Analysis jobs (one step) are claimed by due time then id, as before the lanes."""
    for n, at in enumerate([300.0, 100.0, 200.0, 100.0]):
        store.register_revision(
            folder="/in", path=f"/in/a{n}.wav", rel_path=f"a{n}.wav", size=10, mtime_ns=1, inode=n,
            jobs=[("analyze", "analyze")], now=at,
        )  # fmt: skip
    order = [store.claim("analyze", "w", now=1000.0).file.path for _ in range(4)]
    assert order == ["/in/a1.wav", "/in/a3.wav", "/in/a2.wav", "/in/a0.wav"]
    assert store.claim("analyze", "w", now=1000.0) is None


def test_live_files_and_higher_priorities_go_first_but_the_backlog_keeps_a_share(store):
    """Among due new work, a higher folder priority goes first, then live files, yet every FIRST_RUN + 1-th new-lane
    claim takes the most overdue job: 40 live files arriving cannot hold back the backlog."""
    from watcher.store.lanes import FIRST_RUN

    def add(name: str, n: int, at: float, **rank: object) -> None:
        store.register_revision(
            folder="/in", path=f"/in/{name}{n}.wav", rel_path=f"{name}{n}.wav", size=10, mtime_ns=1, inode=n,
            jobs=[("analyze", "analyze")], now=at, **rank,
        )  # fmt: skip

    for n in range(20):
        add("old", n, 100.0 + n)  # the backlog, due first
    for n in range(40):
        add("live", 100 + n, 500.0 + n, live=True)
    add("vip", 200, 900.0, priority=5)  # a folder with a higher priority, backlog
    order = [store.claim("analyze", "w", now=1000.0).file.path for _ in range(61)]
    kinds = "".join(p.removeprefix("/in/")[0] for p in order)  # o(ld), l(ive), v(ip)
    assert kinds[: FIRST_RUN + 1] == "v" + "l" * (FIRST_RUN - 1) + "o"  # priority, live, then the backlog's turn
    assert order[FIRST_RUN] == "/in/old0.wav"  # the most overdue of the backlog
    assert order[1:FIRST_RUN] == [f"/in/live{100 + n}.wav" for n in range(FIRST_RUN - 1)]  # live ones oldest first
    head = kinds[: kinds.rindex("l") + 1]
    assert head.count("o") == len(head) // (FIRST_RUN + 1)  # one backlog claim in every FIRST_RUN + 1
    assert store.claim("analyze", "w", now=1000.0) is None


def test_promoted_jobs_rank_as_live_and_are_counted_by_file(store):
    """`watcher scan PATH` on files already waiting: their pending jobs rank as live (claimed before the backlog);
    the answer counts files moved, not jobs, and leaves jobs live already or no longer pending alone."""

    def add(n: int, **rank: object) -> int:
        file_id, _ = store.register_revision(
            folder="/in", path=f"/in/f{n}.wav", rel_path=f"f{n}.wav", size=10, mtime_ns=1, inode=n,
            jobs=[("analyze", "analyze"), ("archive", "check")], now=100.0 + n, **rank,
        )  # fmt: skip
        return file_id

    for n in range(6):
        add(n, live=n == 1)
    jobs = {(j.file.path, j.pipeline): j for j in store.jobs_of_current()}
    done = store.claim("archive", "w", now=1000.0)
    assert done is not None and done.file.path == "/in/f1.wav"  # the live one
    store.release(done, state=State.DONE)
    wanted = [jobs[(f"/in/f{n}.wav", p)].id for n in (1, 4, 5) for p in ("analyze", "archive")]
    assert store.promote(wanted) == 2  # f4 and f5; f1 was live already
    assert store.promote(wanted) == 0  # nothing left to move
    order = [store.claim("analyze", "w", now=1000.0).file.path for _ in range(3)]
    assert order == ["/in/f1.wav", "/in/f4.wav", "/in/f5.wav"]  # live first, oldest first among them
    assert store.claim("archive", "w", now=1000.0).file.path == "/in/f4.wav"


def test_a_version_5_store_gets_the_claim_indexes(tmp_path):
    """Migration 6 replaces the one due-index by the lanes' partial indexes; pending work is claimed in lane order."""
    from watcher.store.sqlite.schema import SCHEMA

    db = sqlite3.connect(tmp_path / "w.db")
    for script in SCHEMA[:5]:
        db.executescript(script)
    db.executescript(
        """
        PRAGMA user_version = 5;
        INSERT INTO files VALUES (1, '/in', '/in/a.wav', 'a.wav', 10, 1, 7, 'ab', 1, 0),
                                 (2, '/in', '/in/b.wav', 'b.wav', 10, 1, 8, 'cd', 1, 0);
        INSERT INTO jobs (id, file_id, pipeline, step, state, next_attempt_at, data, updated_at)
            VALUES (1, 1, 'archive', 'upload', 'pending', 10, '{}', 0),
                   (2, 2, 'archive', 'process', 'pending', 20, '{}', 0);
        """
    )
    db.close()
    store = Store(tmp_path / "w.db")
    try:
        indexes = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"jobs_due_in_flight", "jobs_due_new", "jobs_by_owner", "operations_sending"} <= indexes
        assert "jobs_due" not in indexes
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == len(SCHEMA) == 11
        assert store.counts() == {"archive": {"pending": 2}} and store.folder_counts() == {"/in": 2}
        assert [store.claim("archive", "w", now=100.0).step for _ in range(2)] == ["process", "upload"]
    finally:
        store.close()


def test_a_version_1_postgres_store_gets_the_claim_indexes(pg_url):
    """PostgreSQL migration 2 adds the lanes' partial indexes to a store made by the first release."""
    import psycopg

    from watcher.store.postgres import PostgresStore
    from watcher.store.postgres.schema import SCHEMA

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(SCHEMA[0])
        conn.execute("CREATE TABLE schema_version (version integer NOT NULL); INSERT INTO schema_version VALUES (1)")
        conn.execute("INSERT INTO meta VALUES ('store_id', 'postgresql:old')")
        conn.execute(
            "INSERT INTO files (id, folder_id, rel_path, folder, path, size, mtime_ns, inode, created_at) VALUES "
            "(1, 'f', 'a.wav', '/in', '/in/a.wav', 10, 1, 7, 0), (2, 'f', 'b.wav', '/in', '/in/b.wav', 10, 1, 8, 0)"
        )
        conn.execute(
            "INSERT INTO jobs (id, file_id, pipeline, step, next_attempt_at, updated_at) VALUES "
            "(1, 1, 'archive', 'upload', 10, 0), (2, 2, 'archive', 'fetch', 20, 0)"
        )
    store = PostgresStore(pg_url)
    try:
        assert store.store_id == "postgresql:old"
        rows = store._all("SELECT indexname FROM pg_indexes WHERE tablename IN ('jobs', 'operations', 'files')")
        indexes = {r["indexname"] for r in rows}
        assert {"jobs_due_in_flight", "jobs_due_new", "operations_sending", "files_replaced", "jobs_gone"} <= indexes
        assert "jobs_due" not in indexes
        assert store._one("SELECT version FROM schema_version") == {"version": len(SCHEMA)}
        now = store._local_time(100.0)
        assert [store.claim("archive", "w", now=now).step for _ in range(2)] == ["fetch", "upload"]
    finally:
        store.close()


def test_retention_forgets_deleted_files_and_keeps_current_ones(store):
    """A current revision whose jobs all ended ``gone`` (deleted) is forgotten after the retention; one with a job
    still done, or any pending, stays."""
    for name in ("gone", "done", "mixed"):
        store.register_revision(
            folder="/in", path=f"/in/{name}.wav", rel_path=f"{name}.wav", size=1, mtime_ns=1, inode=1,
            jobs=[("analyze", "analyze"), ("archive", "check")], now=0.0,
        )  # fmt: skip
    ends = {"gone": ("gone", "gone"), "done": ("done", "done"), "mixed": ("gone", "done")}
    for pipeline in ("analyze", "archive"):
        for _ in range(3):
            job = store.claim(pipeline, "w")
            store.release(job, state=ends[job.file.path[4:-4]][pipeline == "archive"])
    later = time.time() + 91 * 86400
    assert store.prune(90) == 0  # ended just now: kept for the retention period
    assert store.prune(90, now=later) == 1
    assert store.current_revision("/in/gone.wav") is None
    assert store.current_revision("/in/done.wav") is not None and store.current_revision("/in/mixed.wav") is not None


def test_one_analysed_files_round_trips_to_sqlite_stay_few(tmp_path):
    """The store work of one analysed file (register, claim, hash, a paid request of three models, each result,
    the ledger's ending, the release) is a bounded number of statements, and leaves the same rows as ever."""
    from watcher.store import Operation

    store = Store(tmp_path / "s.db")
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    store.register_revisions([NewRevision("/in", "/in/a.wav", "a.wav", 10, 1, 7)], jobs=[("analyze", "analyze")])
    job = store.claim("analyze", "me")
    assert job is not None
    store.set_sha256(job.file.id, "ab" * 32)
    store.results_for("ab" * 32, "remote")
    ops = [Operation("ab" * 32, "remote", f"analyze:m{i}", "", "reask") for i in range(3)]
    tickets = store.gate_take(ops, "me", budget="analysis", seconds=2.5)
    assert [t.verdict for t in tickets] == ["send"] * 3
    for i, (op, ticket) in enumerate(zip(ops, tickets, strict=True)):
        store.save_result("ab" * 32, "remote", StoredResult(f"m{i}", f"m{i}", "1", None, {"x": i}), op, ticket.fence)
    store.ledger_ending(tickets[0].request or 0, "answered")
    store.is_live(job)
    store.release(job, state="done")
    store._db.set_trace_callback(None)
    # a trigger's body is traced as the statement that fired it, once more: it runs inside it, no round trip
    statements = [s for i, s in enumerate(statements) if not i or s != statements[i - 1]]

    # 47 before reads and writes were folded; each result keeps its own transaction (committed as it arrives)
    assert len(statements) <= 33, "\n".join(statements)
    assert {r["state"] for r in store.in_doubt_operations()} == set()
    assert all(store.gate_get(op)["state"] == "answered" for op in ops)  # type: ignore[index]
    assert set(store.results_for("ab" * 32, "remote")) == {"m0", "m1", "m2"}
    spent = store.spend_on(utc_day(time.time()))["analysis"]
    assert spent["seconds"] == 2.5 and spent["calls"] == 1
    assert store.get_job(job.id).state == "done"  # type: ignore[union-attr]
    store.close()
