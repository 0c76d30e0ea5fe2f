"""The store's tables, one migration per schema version (kept in SQLite's ``user_version``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator


def _first(doc: str, field: str) -> str:
    """SQL for a field of a stored result's JSON (``doc``), its first element when it is a list."""
    return (
        f"CASE json_type({doc}, '$.{field}') WHEN 'array' THEN json_extract({doc}, '$.{field}[0]') "
        f"ELSE json_extract({doc}, '$.{field}') END"
    )


def _number(doc: str, field: str) -> str:
    """SQL for a numeric field of a stored result's JSON, NULL when it is no number."""
    return f"CASE WHEN json_type({doc}, '$.{field}') IN ('integer', 'real') THEN json_extract({doc}, '$.{field}') END"


def _latest(model: str, expression: str) -> str:
    """SQL for ``expression`` over the newest stored result of ``model`` for the row's content."""
    return (
        f"(SELECT {expression.format(doc='r.results')} FROM results r WHERE r.sha256=files.sha256 "
        f"AND r.model_name='{model}' AND json_valid(r.results) ORDER BY r.created_at DESC LIMIT 1)"
    )


_KEY, _SCALE, _BPM = _first("{doc}", "key"), _first("{doc}", "scale"), _number("{doc}", "bpm")
_TAGS_FROM_NEW = (
    f"music_key=CASE new.model_name WHEN 'key' THEN {_KEY.format(doc='new.results')} ELSE music_key END, "
    f"music_scale=CASE new.model_name WHEN 'key' THEN {_SCALE.format(doc='new.results')} ELSE music_scale END, "
    f"bpm=CASE new.model_name WHEN 'bpm_degara' THEN {_BPM.format(doc='new.results')} ELSE bpm END"
)
_FROM_RESULTS = (
    f"music_key={_latest('key', _KEY)}, music_scale={_latest('key', _SCALE)}, bpm={_latest('bpm_degara', _BPM)}"
)
SCHEMA = [
    # version 1
    """
    CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        folder TEXT NOT NULL,
        path TEXT NOT NULL,
        rel_path TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL,
        sha256 TEXT,
        current INTEGER NOT NULL DEFAULT 1,
        created_at REAL NOT NULL,
        UNIQUE (path, size, mtime_ns, inode)
    );
    CREATE INDEX files_by_path ON files (path, current);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        file_id INTEGER NOT NULL REFERENCES files (id),
        kind TEXT NOT NULL,
        stage TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        error_kind TEXT,
        lease_owner TEXT,
        lease_until REAL,
        data TEXT NOT NULL DEFAULT '{}',
        updated_at REAL NOT NULL,
        UNIQUE (file_id, kind)
    );
    CREATE INDEX jobs_due ON jobs (kind, stage, next_attempt_at);
    CREATE TABLE results (
        sha256 TEXT NOT NULL,
        backend TEXT NOT NULL,
        requested TEXT NOT NULL,
        model_name TEXT NOT NULL,
        model_version TEXT,
        correlation_id TEXT,
        results TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (sha256, backend, requested)
    );
    """,
    # version 2: IDs returned by paid remote calls, keyed by content, so no call is ever paid twice
    """
    CREATE TABLE remote (
        sha256 TEXT NOT NULL,
        service TEXT NOT NULL,
        kind TEXT NOT NULL,
        params TEXT NOT NULL,
        remote_id TEXT NOT NULL,
        state TEXT NOT NULL,
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (sha256, service, kind, params)
    );
    """,
    # version 3: folders paused by `watcher pause`, kept across restarts
    """
    CREATE TABLE folder_state (
        path TEXT PRIMARY KEY,
        paused INTEGER NOT NULL DEFAULT 0,
        mode TEXT,
        reason TEXT,
        available INTEGER,
        updated_at REAL NOT NULL
    );
    """,
    # version 4: the gate for paid operations (replaces `remote`), the spend ledger, and per-day totals
    """
    CREATE TABLE operations (
        sha256 TEXT NOT NULL,
        service TEXT NOT NULL,
        operation TEXT NOT NULL,
        params TEXT NOT NULL,
        on_doubt TEXT NOT NULL,
        state TEXT NOT NULL,
        result TEXT,
        remote_state TEXT,
        remote_error TEXT,
        holder TEXT,
        lease_until REAL,
        sends INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        since REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (sha256, service, operation, params)
    );
    INSERT INTO operations (sha256, service, operation, params, on_doubt, state, result, remote_state,
                            remote_error, sends, created_at, updated_at)
        SELECT sha256, 'legacy:' || service,
               CASE kind WHEN 'audio' THEN 'upload' WHEN 'restored' THEN 'restore' WHEN 'mastered' THEN 'master'
                    ELSE kind END,
               params, 'hold', 'answered', remote_id, state, error, 1, created_at, updated_at FROM remote;
    DROP TABLE remote;
    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        day TEXT NOT NULL,
        service TEXT NOT NULL,
        operation TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        seconds REAL NOT NULL,
        models INTEGER NOT NULL DEFAULT 0,
        outcome TEXT NOT NULL
    );
    CREATE INDEX ledger_by_day ON ledger (day, service);
    CREATE TABLE spend (
        day TEXT NOT NULL,
        service TEXT NOT NULL,
        seconds REAL NOT NULL DEFAULT 0,
        calls INTEGER NOT NULL DEFAULT 0,
        capped_at REAL,
        PRIMARY KEY (day, service)
    );
    UPDATE results SET backend = 'legacy:' || backend;
    CREATE INDEX jobs_by_file ON jobs (file_id);
    """,
    # version 5: one word per idea. A job belongs to a *pipeline*, stands at a *step*, is in a *state*;
    # its last error has a *code*. Failed and held jobs keep the step they stopped at.
    """
    ALTER TABLE jobs RENAME COLUMN kind TO pipeline;
    ALTER TABLE jobs RENAME COLUMN stage TO step;
    ALTER TABLE jobs RENAME COLUMN error_kind TO error_code;
    ALTER TABLE jobs ADD COLUMN state TEXT NOT NULL DEFAULT 'pending';
    UPDATE jobs SET state = CASE
        WHEN step IN ('done', 'failed', 'skipped', 'superseded', 'gone') THEN step
        WHEN error_code = 'in_doubt' THEN 'in_doubt'
        ELSE 'pending' END;
    UPDATE jobs SET step = COALESCE(json_extract(data, '$.failed_in'), 'pending')
        WHERE state IN ('done', 'failed', 'skipped', 'superseded', 'gone');
    UPDATE jobs SET step = CASE pipeline WHEN 'analyze' THEN 'analyze' ELSE 'check' END WHERE step = 'pending';
    UPDATE jobs SET next_attempt_at = 0 WHERE state = 'in_doubt';
    DROP INDEX jobs_due;
    CREATE INDEX jobs_due ON jobs (pipeline, state, next_attempt_at);
    """,
    # version 6: what the daemon reads at every claim, poll and lease renewal is found through an index, so
    # its cost follows the work due, not the size of the store. Pending jobs stand in two lanes (see
    # store.lanes), each a partial index in claim order; the predicates must read as the lanes' conditions.
    """
    DROP INDEX jobs_due;
    CREATE INDEX jobs_due_in_flight ON jobs (pipeline, next_attempt_at)
        WHERE state = 'pending' AND step IN ('process', 'fetch');
    CREATE INDEX jobs_due_new ON jobs (pipeline, next_attempt_at)
        WHERE state = 'pending' AND step NOT IN ('process', 'fetch');
    CREATE INDEX jobs_by_owner ON jobs (lease_owner) WHERE lease_owner IS NOT NULL;
    CREATE INDEX operations_sending ON operations (holder) WHERE state = 'sending';
    CREATE INDEX operations_in_doubt ON operations (since) WHERE state = 'in_doubt';
    CREATE INDEX files_replaced ON files (id) WHERE current = 0;
    CREATE INDEX files_current ON files (folder) WHERE current = 1;
    CREATE INDEX jobs_gone ON jobs (file_id) WHERE state = 'gone';
    """,
    # version 7: the heartbeat counts the jobs still open (pending, held, failed) through an index, not by
    # reading every finished job; the predicate must read as OPEN_STATES below.
    """
    CREATE INDEX jobs_open ON jobs (pipeline, state) WHERE state IN ('pending', 'in_doubt', 'failed');
    """,
    # version 8: a ledger line says what it is held against the bill by: the endpoint and account it went to,
    # whether it is a first send, a re-ask or a re-send, and whether its seconds are an estimate (no duration
    # in the headers: an upper bound) or settled. Old lines are first sends with settled seconds.
    """
    ALTER TABLE ledger ADD COLUMN kind TEXT NOT NULL DEFAULT 'first';
    ALTER TABLE ledger ADD COLUMN estimated INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE ledger ADD COLUMN endpoint TEXT NOT NULL DEFAULT '';
    """,
    # version 9: operation transitions are compare-and-set on (holder, generation); the generation grows with each
    # take. ``take_id`` and ``request`` let a take replayed after a lost acknowledgement recognise itself, and
    # ``late_result`` keeps what a holder that lost the operation was still paid for. A job's ``claims`` grows with
    # each claim, so a claimer whose lease ran out cannot change a job another claim by the same holder has.
    """
    ALTER TABLE jobs ADD COLUMN claims INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE operations ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE operations ADD COLUMN take_id TEXT;
    ALTER TABLE operations ADD COLUMN request INTEGER;
    ALTER TABLE operations ADD COLUMN late_result TEXT;
    UPDATE operations SET generation = sends;
    """,
    # version 10: today's files first. A job carries its folder's priority and whether its file was found live
    # (see store.lanes); the new lane gets a second partial index in that order, so a claim stays one lookup.
    """
    ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN live INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX jobs_due_first ON jobs (pipeline, priority DESC, live DESC, next_attempt_at)
        WHERE state = 'pending' AND step NOT IN ('process', 'fetch');
    """,
    # version 11: a million files stay fast. ``job_counts`` holds the jobs of current revisions per pipeline and
    # state, and ``folder_counts`` the current revisions per folder, kept by triggers in the writing transaction
    # (never recounted per read); a file's key, scale and tempo are copied from its stored results so the page
    # filters them through indexes; finished jobs are indexed by time for the backlog's rate.
    """
    CREATE TABLE job_counts (
        pipeline TEXT NOT NULL, state TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (pipeline, state)
    ) WITHOUT ROWID;
    INSERT INTO job_counts SELECT j.pipeline, j.state, COUNT(*) FROM jobs j JOIN files f ON f.id=j.file_id
        WHERE f.current=1 GROUP BY j.pipeline, j.state;
    CREATE TABLE folder_counts (folder TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO folder_counts SELECT folder, COUNT(*) FROM files WHERE current=1 GROUP BY folder;
    CREATE TRIGGER jobs_counted_in AFTER INSERT ON jobs WHEN (SELECT current FROM files WHERE id=new.file_id)=1
    BEGIN
        INSERT INTO job_counts VALUES (new.pipeline, new.state, 1) ON CONFLICT DO UPDATE SET n=n+1;
    END;
    CREATE TRIGGER jobs_counted_out AFTER DELETE ON jobs WHEN (SELECT current FROM files WHERE id=old.file_id)=1
    BEGIN
        UPDATE job_counts SET n=n-1 WHERE pipeline=old.pipeline AND state=old.state;
    END;
    CREATE TRIGGER jobs_counted_moved AFTER UPDATE OF state, pipeline ON jobs
        WHEN (old.state IS NOT new.state OR old.pipeline IS NOT new.pipeline)
        AND (SELECT current FROM files WHERE id=new.file_id)=1
    BEGIN
        UPDATE job_counts SET n=n-1 WHERE pipeline=old.pipeline AND state=old.state;
        INSERT INTO job_counts VALUES (new.pipeline, new.state, 1) ON CONFLICT DO UPDATE SET n=n+1;
    END;
    CREATE TRIGGER files_counted_in AFTER INSERT ON files WHEN new.current=1
    BEGIN
        INSERT INTO folder_counts VALUES (new.folder, 1) ON CONFLICT DO UPDATE SET n=n+1;
    END;
    CREATE TRIGGER files_counted_out AFTER DELETE ON files WHEN old.current=1
    BEGIN
        UPDATE folder_counts SET n=n-1 WHERE folder=old.folder;
    END;
    CREATE TRIGGER files_counted_moved AFTER UPDATE OF current ON files WHEN old.current IS NOT new.current
    BEGIN
        INSERT INTO folder_counts VALUES (new.folder, CASE new.current WHEN 1 THEN 1 ELSE -1 END)
            ON CONFLICT DO UPDATE SET n=n+excluded.n;
        INSERT INTO job_counts SELECT pipeline, state, CASE new.current WHEN 1 THEN 1 ELSE -1 END * COUNT(*)
            FROM jobs WHERE file_id=new.id GROUP BY pipeline, state ON CONFLICT DO UPDATE SET n=n+excluded.n;
    END;
    ALTER TABLE files ADD COLUMN music_key TEXT;
    ALTER TABLE files ADD COLUMN music_scale TEXT;
    ALTER TABLE files ADD COLUMN bpm REAL;
    CREATE INDEX files_by_sha256 ON files (sha256) WHERE sha256 IS NOT NULL;
    CREATE TRIGGER files_tagged_by_result AFTER INSERT ON results
        WHEN new.model_name IN ('key', 'bpm_degara') AND json_valid(new.results)
    BEGIN
        UPDATE files SET """
    + _TAGS_FROM_NEW
    + """
            WHERE sha256=new.sha256;
    END;
    CREATE TRIGGER files_tagged_by_hash AFTER UPDATE OF sha256 ON files WHEN new.sha256 IS NOT NULL
    BEGIN
        UPDATE files SET """
    + _FROM_RESULTS
    + """ WHERE id=new.id;
    END;
    UPDATE files SET """
    + _FROM_RESULTS
    + """ WHERE sha256 IS NOT NULL;
    DROP INDEX files_current;
    CREATE INDEX files_in_folder ON files (folder, path) WHERE current = 1;
    CREATE INDEX files_by_key ON files (music_key, music_scale, path) WHERE current = 1;
    CREATE INDEX files_by_bpm ON files (bpm, path) WHERE current = 1 AND bpm IS NOT NULL;
    CREATE INDEX jobs_finished ON jobs (pipeline, updated_at) WHERE state IN ('done', 'failed', 'skipped');
    CREATE INDEX jobs_open_files ON jobs (state, file_id) WHERE state IN ('pending', 'in_doubt', 'failed');
    DROP INDEX files_replaced;
    CREATE INDEX files_replaced ON files (created_at) WHERE current = 0;
    CREATE INDEX ledger_by_time ON ledger (service, at);
    """,
]
# The states still open, as the heartbeat counts them; the jobs_open indexes (both stores) have this predicate.
OPEN_STATES = "j.state IN ('pending', 'in_doubt', 'failed')"
_NOT_PAUSED = "AND f.folder NOT IN (SELECT path FROM folder_state WHERE paused=1) "


def statements(script: str) -> Iterator[str]:
    """The statements of a migration script, whole: a trigger's body holds semicolons of its own."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""
