"""The PostgreSQL schema (versioned migrations) and the SQL fragments the store's parts share."""

from __future__ import annotations

from watcher.store.schema import TERMINAL

LOCK_KEY = 0x77617463  # the advisory lock migrations run under ("watc")
# The database's clock, in seconds since the epoch: every lease, due time and heartbeat is computed with it.
NOW = "extract(epoch FROM now())::float8"
# A node whose heartbeat is older than this is dead: its name may be taken, its temp files swept.
NODE_ALIVE_SECONDS = 60.0
SCHEMA = [
    # version 1
    """
    CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
    CREATE TABLE files (
        id bigserial PRIMARY KEY,
        folder_id text NOT NULL,
        rel_path bytea NOT NULL,
        folder bytea NOT NULL,
        path bytea NOT NULL,
        size bigint NOT NULL,
        mtime_ns bigint NOT NULL,
        inode bigint NOT NULL,
        sha256 text,
        current boolean NOT NULL DEFAULT true,
        created_at double precision NOT NULL,
        UNIQUE (folder_id, rel_path, size, mtime_ns)
    );
    CREATE INDEX files_current ON files (folder_id, rel_path) WHERE current;
    CREATE INDEX files_by_path ON files (path) WHERE current;
    CREATE TABLE jobs (
        id bigserial PRIMARY KEY,
        file_id bigint NOT NULL REFERENCES files (id),
        pipeline text NOT NULL,
        step text NOT NULL,
        state text NOT NULL DEFAULT 'pending',
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at double precision NOT NULL,
        last_error text,
        error_code text,
        lease_owner text,
        lease_until double precision,
        data text NOT NULL DEFAULT '{}',
        updated_at double precision NOT NULL,
        UNIQUE (file_id, pipeline)
    );
    CREATE INDEX jobs_due ON jobs (pipeline, state, next_attempt_at);
    CREATE INDEX jobs_by_owner ON jobs (lease_owner) WHERE lease_owner IS NOT NULL;
    CREATE TABLE results (
        sha256 text NOT NULL,
        backend text NOT NULL,
        requested text NOT NULL,
        model_name text NOT NULL,
        model_version text,
        correlation_id text,
        results text NOT NULL,
        created_at double precision NOT NULL,
        PRIMARY KEY (sha256, backend, requested)
    );
    CREATE TABLE operations (
        sha256 text NOT NULL,
        service text NOT NULL,
        operation text NOT NULL,
        params text NOT NULL,
        on_doubt text NOT NULL,
        state text NOT NULL,
        result text,
        remote_state text,
        remote_error text,
        holder text,
        lease_until double precision,
        sends integer NOT NULL DEFAULT 0,
        error text,
        since double precision,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        PRIMARY KEY (sha256, service, operation, params)
    );
    CREATE TABLE ledger (
        id bigserial PRIMARY KEY,
        at double precision NOT NULL,
        day text NOT NULL,
        service text NOT NULL,
        operation text NOT NULL,
        sha256 text NOT NULL,
        seconds double precision NOT NULL,
        models integer NOT NULL DEFAULT 0,
        outcome text NOT NULL
    );
    CREATE INDEX ledger_by_day ON ledger (day, service);
    CREATE TABLE spend (
        day text NOT NULL,
        service text NOT NULL,
        seconds double precision NOT NULL DEFAULT 0,
        calls integer NOT NULL DEFAULT 0,
        capped_at double precision,
        PRIMARY KEY (day, service)
    );
    CREATE TABLE folder_state (
        folder_id text PRIMARY KEY,
        folder bytea NOT NULL,
        paused boolean NOT NULL DEFAULT false,
        mode text,
        reason text,
        available boolean,
        updated_at double precision NOT NULL
    );
    CREATE TABLE nodes (
        name text PRIMARY KEY,
        owner text NOT NULL,
        version text NOT NULL,
        started_at double precision NOT NULL,
        heartbeat_at double precision NOT NULL,
        folders text NOT NULL DEFAULT '[]'
    );
    """,
    # version 2: claims, next-due and lease renewals read through indexes, so their cost follows the work due,
    # not the size of the store. Pending jobs stand in two lanes (see watcher.store.lanes), each a partial
    # index in claim order; the predicates must read as the lanes' conditions.
    """
    DROP INDEX jobs_due;
    CREATE INDEX jobs_due_in_flight ON jobs (pipeline, next_attempt_at, id)
        WHERE state = 'pending' AND step IN ('process', 'fetch');
    CREATE INDEX jobs_due_new ON jobs (pipeline, next_attempt_at, id)
        WHERE state = 'pending' AND step NOT IN ('process', 'fetch');
    CREATE INDEX operations_sending ON operations (holder) WHERE state = 'sending';
    CREATE INDEX operations_in_doubt ON operations (since) WHERE state = 'in_doubt';
    CREATE INDEX files_replaced ON files (id) WHERE NOT current;
    CREATE INDEX jobs_gone ON jobs (file_id) WHERE state = 'gone';
    """,
    # version 3: the heartbeat counts the jobs still open (pending, held, failed) through an index, not by
    # reading every finished job; the predicate must read as OPEN_STATES in watcher.store.schema.
    """
    CREATE INDEX jobs_open ON jobs (pipeline, state) WHERE state IN ('pending', 'in_doubt', 'failed');
    """,
    # version 4: a ledger line says what it is held against the bill by (as version 8 of watcher.store.schema).
    """
    ALTER TABLE ledger ADD COLUMN kind text NOT NULL DEFAULT 'first';
    ALTER TABLE ledger ADD COLUMN estimated boolean NOT NULL DEFAULT false;
    ALTER TABLE ledger ADD COLUMN endpoint text NOT NULL DEFAULT '';
    """,
    # version 5: operation transitions are compare-and-set on (holder, generation); the generation grows with each
    # take. ``take_id`` and ``request`` let a take replayed after a lost commit acknowledgement recognise itself,
    # ``late_result`` keeps what a holder that lost the operation was still paid for. A node is its generated ID
    # (kept in its state folder): its name is for people, and one name belongs to one live node at a time. A job's
    # ``claims`` grows with each claim, so a claimer whose lease ran out cannot change a job claimed again since.
    """
    ALTER TABLE jobs ADD COLUMN claims integer NOT NULL DEFAULT 0;
    ALTER TABLE operations ADD COLUMN generation integer NOT NULL DEFAULT 0;
    ALTER TABLE operations ADD COLUMN take_id text;
    ALTER TABLE operations ADD COLUMN request bigint;
    ALTER TABLE operations ADD COLUMN late_result text;
    UPDATE operations SET generation = sends;
    ALTER TABLE nodes ADD COLUMN node_id text;
    """,
    # version 6: today's files first (as version 10 of watcher.store.schema).
    """
    ALTER TABLE jobs ADD COLUMN priority integer NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN live integer NOT NULL DEFAULT 0;
    CREATE INDEX jobs_due_first ON jobs (pipeline, priority DESC, live DESC, next_attempt_at, id)
        WHERE state = 'pending' AND step NOT IN ('process', 'fetch');
    """,
]
NOT_PAUSED = "AND f.folder_id NOT IN (SELECT folder_id FROM folder_state WHERE paused) "
JOB_SELECT = """
    SELECT j.*, f.id AS fid, f.folder_id, f.folder, f.path, f.rel_path, f.size, f.mtime_ns, f.inode, f.sha256,
           f.current
    FROM jobs j JOIN files f ON f.id = j.file_id
"""
# A job's row changes only while its holder keeps the lease and it has not been superseded.
FENCE = (
    " AND lease_owner IS NOT DISTINCT FROM %s AND (%s::integer IS NULL OR claims = %s)"
    " AND state NOT IN ('superseded', 'gone')"
)
KEY_WHERE = "sha256=%s AND service=%s AND operation=%s AND params=%s"
# An operation's outcome changes it only while the take that sent it still holds it (see watcher.store.gate).
OP_FENCED = " AND state='sending' AND holder=%s AND generation=%s"
OP_UNHELD = " AND state IN ('open', 'reask', 'in_doubt')"
TERMINAL_STATES = tuple(sorted(TERMINAL))
