"""The PostgreSQL schema (versioned migrations) and the SQL fragments the store's parts share."""

from __future__ import annotations

from watcher.store.models import TERMINAL

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
    # reading every finished job; the predicate must read as OPEN_STATES in watcher.store.sqlite.schema.
    """
    CREATE INDEX jobs_open ON jobs (pipeline, state) WHERE state IN ('pending', 'in_doubt', 'failed');
    """,
    # version 4: a ledger line says what it is held against the bill by (as version 8 of watcher.store.sqlite.schema).
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
    # version 6: today's files first (as version 10 of watcher.store.sqlite.schema).
    """
    ALTER TABLE jobs ADD COLUMN priority integer NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN live integer NOT NULL DEFAULT 0;
    CREATE INDEX jobs_due_first ON jobs (pipeline, priority DESC, live DESC, next_attempt_at, id)
        WHERE state = 'pending' AND step NOT IN ('process', 'fetch');
    """,
    # version 7: a million files stay fast (as version 11 of the SQLite schema). The counts are kept in rows per
    # database session's slot (its backend pid modulo 64): each node's connections write their own rows, so no
    # single hot row serialises the nodes; a read sums the slots.
    """
    CREATE TABLE job_counts (
        slot integer NOT NULL, pipeline text NOT NULL, state text NOT NULL, n bigint NOT NULL,
        PRIMARY KEY (slot, pipeline, state)
    );
    INSERT INTO job_counts SELECT 0, j.pipeline, j.state, COUNT(*) FROM jobs j JOIN files f ON f.id=j.file_id
        WHERE f.current GROUP BY j.pipeline, j.state;
    CREATE TABLE folder_counts (
        slot integer NOT NULL, folder_id text NOT NULL, n bigint NOT NULL, PRIMARY KEY (slot, folder_id)
    );
    INSERT INTO folder_counts SELECT 0, folder_id, COUNT(*) FROM files WHERE current GROUP BY folder_id;
    CREATE FUNCTION watcher_count_jobs(p text, s text, d bigint) RETURNS void LANGUAGE sql AS $$
        INSERT INTO job_counts VALUES (mod(pg_backend_pid(), 64), p, s, d)
        ON CONFLICT (slot, pipeline, state) DO UPDATE SET n = job_counts.n + excluded.n
    $$;
    CREATE FUNCTION watcher_count_files(fid text, d bigint) RETURNS void LANGUAGE sql AS $$
        INSERT INTO folder_counts VALUES (mod(pg_backend_pid(), 64), fid, d)
        ON CONFLICT (slot, folder_id) DO UPDATE SET n = folder_counts.n + excluded.n
    $$;
    CREATE FUNCTION watcher_jobs_counted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP IN ('UPDATE', 'DELETE') AND (SELECT current FROM files WHERE id = OLD.file_id) THEN
            PERFORM watcher_count_jobs(OLD.pipeline, OLD.state, -1);
        END IF;
        IF TG_OP IN ('UPDATE', 'INSERT') AND (SELECT current FROM files WHERE id = NEW.file_id) THEN
            PERFORM watcher_count_jobs(NEW.pipeline, NEW.state, 1);
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER jobs_counted AFTER INSERT OR DELETE ON jobs
        FOR EACH ROW EXECUTE FUNCTION watcher_jobs_counted();
    CREATE TRIGGER jobs_counted_moved AFTER UPDATE OF state, pipeline ON jobs FOR EACH ROW
        WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.pipeline IS DISTINCT FROM NEW.pipeline)
        EXECUTE FUNCTION watcher_jobs_counted();
    CREATE FUNCTION watcher_files_counted() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE d bigint;
    BEGIN
        IF TG_OP = 'INSERT' THEN
            IF NEW.current THEN PERFORM watcher_count_files(NEW.folder_id, 1); END IF;
        ELSIF TG_OP = 'DELETE' THEN
            IF OLD.current THEN PERFORM watcher_count_files(OLD.folder_id, -1); END IF;
        ELSIF OLD.current IS DISTINCT FROM NEW.current THEN
            d := CASE WHEN NEW.current THEN 1 ELSE -1 END;
            PERFORM watcher_count_files(NEW.folder_id, d);
            INSERT INTO job_counts SELECT mod(pg_backend_pid(), 64), pipeline, state, d * COUNT(*)
                FROM jobs WHERE file_id = NEW.id GROUP BY pipeline, state
                ON CONFLICT (slot, pipeline, state) DO UPDATE SET n = job_counts.n + excluded.n;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER files_counted AFTER INSERT OR DELETE OR UPDATE OF current ON files
        FOR EACH ROW EXECUTE FUNCTION watcher_files_counted();
    ALTER TABLE files ADD COLUMN music_key text;
    ALTER TABLE files ADD COLUMN music_scale text;
    ALTER TABLE files ADD COLUMN bpm double precision;
    CREATE FUNCTION watcher_first(doc jsonb, field text) RETURNS text IMMUTABLE LANGUAGE sql AS $$
        SELECT CASE jsonb_typeof(doc -> field) WHEN 'array' THEN doc -> field ->> 0 ELSE doc ->> field END
    $$;
    CREATE FUNCTION watcher_json(doc text) RETURNS jsonb IMMUTABLE LANGUAGE plpgsql AS $$
    BEGIN
        RETURN doc::jsonb;
    EXCEPTION WHEN others THEN
        RETURN NULL;
    END $$;
    CREATE FUNCTION watcher_tags(sha text, OUT k text, OUT s text, OUT b double precision) LANGUAGE sql AS $$
        SELECT (SELECT watcher_first(watcher_json(results), 'key') FROM results WHERE sha256 = sha
                    AND model_name = 'key' ORDER BY created_at DESC LIMIT 1),
               (SELECT watcher_first(watcher_json(results), 'scale') FROM results WHERE sha256 = sha
                    AND model_name = 'key' ORDER BY created_at DESC LIMIT 1),
               (SELECT CASE WHEN jsonb_typeof(watcher_json(results) -> 'bpm') = 'number'
                    THEN (watcher_json(results) ->> 'bpm')::float8 END FROM results WHERE sha256 = sha
                    AND model_name = 'bpm_degara' ORDER BY created_at DESC LIMIT 1)
    $$;
    CREATE FUNCTION watcher_results_tagged() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.model_name IN ('key', 'bpm_degara') THEN
            UPDATE files f SET music_key = t.k, music_scale = t.s, bpm = t.b
                FROM watcher_tags(NEW.sha256) t WHERE f.sha256 = NEW.sha256;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER results_tagged AFTER INSERT OR UPDATE ON results
        FOR EACH ROW EXECUTE FUNCTION watcher_results_tagged();
    CREATE FUNCTION watcher_files_tagged() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        SELECT t.k, t.s, t.b INTO NEW.music_key, NEW.music_scale, NEW.bpm FROM watcher_tags(NEW.sha256) t;
        RETURN NEW;
    END $$;
    CREATE TRIGGER files_tagged BEFORE UPDATE OF sha256 ON files FOR EACH ROW
        WHEN (NEW.sha256 IS NOT NULL AND NEW.sha256 IS DISTINCT FROM OLD.sha256)
        EXECUTE FUNCTION watcher_files_tagged();
    CREATE INDEX files_by_sha256 ON files (sha256) WHERE sha256 IS NOT NULL;
    UPDATE files f SET music_key = t.k, music_scale = t.s, bpm = t.b
        FROM (SELECT DISTINCT sha256 FROM results WHERE model_name IN ('key', 'bpm_degara')) r,
        LATERAL watcher_tags(r.sha256) t WHERE f.sha256 = r.sha256;
    CREATE INDEX files_by_key ON files (music_key, music_scale, path) WHERE current;
    CREATE INDEX files_by_bpm ON files (bpm, path) WHERE current AND bpm IS NOT NULL;
    CREATE INDEX jobs_finished ON jobs (pipeline, updated_at) WHERE state IN ('done', 'failed', 'skipped');
    CREATE INDEX ledger_by_time ON ledger (service, at);
    DROP INDEX files_replaced;
    CREATE INDEX files_replaced ON files (created_at) WHERE NOT current;
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
# An operation's ending changes it only while the take that sent it still holds it (see watcher.store.sqlite.gate).
OP_FENCED = " AND state='sending' AND holder=%s AND generation=%s"
OP_UNHELD = " AND state IN ('open', 'reask', 'in_doubt')"
TERMINAL_STATES = tuple(sorted(TERMINAL))
