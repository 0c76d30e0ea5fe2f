"""`watcher store migrate --to URL`: one machine's SQLite store copied into an empty PostgreSQL database, verified,
and its folders handed over, so that daemons on several machines go on from it without paying for anything again.

It runs with the daemons stopped (the state folder's lock is held throughout; a dry run only warns) and into an
empty database only; leases and paid calls a daemon that died left behind are given back first, as its start would.
The PostgreSQL schema is made by the PostgreSQL adapter's own migrations; then every table both schemas hold is
copied in one transaction, IDs kept (so references hold) and sequences set after. Before that transaction commits,
each table is verified: its row count and a checksum computed the same way over the rows read from each side (an
order-free sum of each row's digest, its values in a canonical form). Only a verified copy is committed, and only
then are the folders' markers switched to the new store (each keeps its folder ID, which the new store's file rows
are keyed by). A copy that does not verify is rolled back: the target stays empty and the folders stay with the
SQLite store, which keeps its rows either way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from watcher import markers
from watcher.config import Settings
from watcher.errors import ConfigError, StartupError
from watcher.fsutil import read_json_object, write_json_atomic
from watcher.names import display
from watcher.statelock import StateLock
from watcher.store import Store
from watcher.store.postgres import PostgresStore, StoreUnreachable, redact
from watcher.store.postgres.pool import first_line
from watcher.store.postgres.schema import SCHEMA as PG_SCHEMA

MIGRATED = "migrated-to.json"  # in the SQLite store's state folder, once it was copied: where to, and when
# The tables both schemas hold, in the order references allow (jobs name files).
TABLES = ("files", "jobs", "results", "operations", "ledger", "spend", "folder_state")
# Tables a watcher store in PostgreSQL holds (as its migrations make them); a database holding others is not empty.
WATCHER_TABLES = frozenset({"schema_version", *re.findall(r"CREATE TABLE (\w+)", "\n".join(PG_SCHEMA))})
OWN = frozenset({"meta", "schema_version", "nodes"})  # the new store's own: never copied
# Kept by the new store's own triggers as the rows above are copied in (each dialect shapes them its own way).
KEPT_BY_TRIGGERS = frozenset({"job_counts", "folder_counts"})
# A PostgreSQL column made from the SQLite row (the folder ID from the folder's marker, the paths as bytes).
DERIVED = {("files", "folder_id"): "folder", ("folder_state", "folder_id"): "path", ("folder_state", "folder"): "path"}
SOURCE_ONLY = {("folder_state", "path")}  # read only to derive the columns above
_MOD = 1 << 256
Say = Callable[[str], None]
Tamper = Callable[[psycopg.Connection[Any]], None]


@dataclass
class Migrated:
    """What a migration found and did: rows per table, and the folders handed over (or left alone, and why)."""

    counts: dict[str, int]
    store_id: str = ""
    switched: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)
    code: int = 0  # the command's exit code: 0 (a refusal is raised)


def migrate(
    settings: Settings, url: str, *, dry_run: bool = False, say: Say = print, tamper: Tamper | None = None
) -> Migrated:
    """Copy the SQLite store of ``settings`` into the empty PostgreSQL database at ``url`` (see the module);
    ``dry_run``: only count. ``tamper`` (tests) runs on the copy before it is verified."""
    where = redact(url)
    if settings.store.url:
        raise ConfigError(
            f"the configured store is PostgreSQL already ({redact(settings.store.url)}): a migration copies a SQLite "
            "store; run it with the config that names the SQLite store (no [store] url)"
        )
    db = settings.state_dir / "watcher.db"
    if not db.is_file():
        raise ConfigError(f"no SQLite store at {display(str(db))}: nothing to migrate")
    if dry_run:  # a preview, also while the daemon runs (its counts may still change)
        holder = StateLock.holder(settings.state_dir)
        if holder is not None:
            say(f"{holder} runs on this store: stop it before the migration itself (these counts may still change)")
        return _migrate(settings, db, url, where, dry_run=True, say=say, tamper=None)
    say("watcher store migrate runs with every daemon stopped: checking the state folder's lock")
    with StateLock.stopped(settings.state_dir, "nothing was copied"):
        return _migrate(settings, db, url, where, dry_run=False, say=say, tamper=tamper)


def _migrate(
    settings: Settings, db: Path, url: str, where: str, *, dry_run: bool, say: Say, tamper: Tamper | None
) -> Migrated:
    passfile = str(settings.store.passfile) if settings.store.passfile else None
    done = read_json_object(settings.state_dir / MIGRATED)
    if done is not None and not dry_run:
        raise ConfigError(
            f"nothing was copied: this store was migrated to {done.get('to')} at {done.get('at')} (store "
            f"{done.get('store')}), which owns its folders and its later work; a second copy would be an old fork of "
            f"it. To copy it anyway, remove {settings.state_dir / MIGRATED}"
        )
    if not dry_run:  # as a daemon's start would: an older store migrated (a copy kept in backups/), and the leases
        store = Store(db)  # and paid calls of a daemon that died given back (in doubt), since none runs now
        try:
            store.release_leases()
            store.gate_recover()
        finally:
            store.close()
    with _target(url, where, passfile) as conn:
        refusal = not_empty(conn)
    if refusal:
        raise ConfigError(f"nothing was copied: the database at {where} {refusal}; a migration needs an empty one")
    source = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)
    source.row_factory = sqlite3.Row
    try:
        counts = {t: int(source.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in copied(source)}
        say(f"from {display(str(db))} to {where}:")
        for table, n in counts.items():
            say(f"  {table}: {n} row(s)")
        if dry_run:
            say("dry run: nothing was changed")
            return Migrated(counts)
        folders = _folder_ids(settings, source, _sqlite_id(settings.state_dir))
        store_id = _copy(url, where, passfile, source, folders, tamper, say)
    finally:
        source.close()
    migrated = Migrated(counts, store_id)
    at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    write_json_atomic(settings.state_dir / MIGRATED, {"to": where, "store": store_id, "at": at})
    _switch(settings, folders, migrated, where, say)
    return migrated


@contextlib.contextmanager
def _target(url: str, where: str, passfile: str | None) -> Iterator[psycopg.Connection[Any]]:
    kwargs: dict[str, Any] = {"connect_timeout": 10, "application_name": "watcher migrate"}
    if passfile:
        kwargs["passfile"] = passfile
    try:
        conn = psycopg.connect(url, **kwargs)
    except psycopg.Error as exc:
        raise StoreUnreachable(f"nothing was copied: cannot reach the database at {where}: {first_line(exc)}") from None
    try:
        yield conn
    finally:
        conn.close()


def not_empty(conn: psycopg.Connection[Any]) -> str | None:
    """Why the database ``conn`` is connected to is not empty (None: it is). A watcher schema with no rows (made by
    a migration that was rolled back) counts as empty."""
    tables = {
        str(r[0])
        for r in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname = current_schema()"
        )
    }
    other = sorted(tables - WATCHER_TABLES)
    if other:
        return f"holds other tables ({', '.join(other[:5])})"
    for table in sorted(tables & (WATCHER_TABLES - {"meta", "schema_version"})):
        if conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone() != (False,):
            return f"holds a watcher store already (its {table} table has rows)"
    return None


def copied(source: sqlite3.Connection) -> list[str]:
    """The tables both schemas hold, in the order references allow: the known ones first, then any other."""
    theirs = {str(r[0]) for r in source.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return [*TABLES, *sorted((theirs & WATCHER_TABLES) - OWN - KEPT_BY_TRIGGERS - set(TABLES))]


def _sqlite_id(state_dir: Path) -> str | None:
    """The SQLite store's ID as its folders' markers name it (None: it never marked a folder)."""
    with contextlib.suppress(OSError):
        return (state_dir / markers.STORE_ID_FILE).read_text(encoding="utf-8").strip() or None
    return None


def _folder_ids(settings: Settings, source: sqlite3.Connection, mine: str | None) -> dict[str, tuple[str, bool]]:
    """Every folder the store knows or the config names: its folder ID in the new store, and whether its marker
    is handed over (it is this store's). An unmarked configured folder is marked as this store's first (what its
    daemon does at start); a folder that cannot be marked is keyed by its path, as a daemon keys it."""
    known = {str(r[0]) for r in source.execute("SELECT DISTINCT folder FROM files UNION SELECT path FROM folder_state")}
    configured = {str(f.path) for f in settings.folders}
    found: dict[str, tuple[str, bool]] = {}
    for folder in sorted(known | configured):
        marker = markers.read_marker(Path(folder)) if os.path.isdir(folder) else None
        if marker is None and folder in configured and mine is not None:
            owned = markers.claim(Path(folder), mine, settings.store.node_name)
            found[folder] = (owned.folder_id, owned.ours and owned.owner is not None)
        elif marker is not None and mine is not None and marker.get("store") == mine:
            found[folder] = (str(marker.get("folder_id") or folder), True)
        else:
            found[folder] = (folder, False)
    return found


def _copy(
    url: str,
    where: str,
    passfile: str | None,
    source: sqlite3.Connection,
    folders: dict[str, tuple[str, bool]],
    tamper: Tamper | None,
    say: Say,
) -> str:
    """The schema (through the adapter's migrations), then every table in one transaction, verified before it
    commits; the new store's ID."""
    try:
        target = PostgresStore(url, passfile=passfile, name="watcher migrate")
    except StoreUnreachable as exc:
        raise StoreUnreachable(f"nothing was copied: {exc}") from None
    store_id = str(target.store_id)
    target.close()
    with _target(url, where, passfile) as conn:
        try:
            with conn.transaction():
                # a daemon started on this database meanwhile waits until the copy is committed or rolled back
                conn.execute(f"LOCK TABLE {', '.join(sorted(WATCHER_TABLES))} IN ACCESS EXCLUSIVE MODE")
                if not_empty(conn):  # a daemon may have started on it since it was checked
                    raise ConfigError(f"nothing was copied: the database at {where} is in use (rows appeared)")
                made = {t: _copy_table(conn, source, t, folders) for t in copied(source)}
                _set_sequences(conn, made)
                if tamper is not None:
                    tamper(conn)
                _verify(conn, made, where)
                _verify_counts(conn, source, where)
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('migrated_from', %s) ON CONFLICT (key) DO NOTHING",
                    (str(source.execute("PRAGMA database_list").fetchone()[2]),),
                )
        except psycopg.Error as exc:
            raise StartupError(f"nothing was kept in {where} (the copy was rolled back): {first_line(exc)}") from None
    say(f"copied and verified: {sum(n for n, _ in made.values())} row(s) in {len(made)} tables; new store {store_id}")
    return store_id


def _columns(conn: psycopg.Connection[Any], source: sqlite3.Connection, table: str) -> list[tuple[str, str]]:
    """The target table's columns and their types, checked against the source's (the two schemas must agree)."""
    cols = [
        (str(r[0]), str(r[1]))
        for r in conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = %s ORDER BY ordinal_position",
            (table,),
        )
    ]
    theirs = {str(r[1]) for r in source.execute(f"PRAGMA table_info({table})")}
    ours = {name for name, _ in cols}
    missing = sorted(n for n in ours if n not in theirs and (table, n) not in DERIVED)
    extra = sorted(n for n in theirs if n not in ours and (table, n) not in SOURCE_ONLY)
    if missing or extra:
        raise ConfigError(
            f"nothing was copied: the two stores' {table} tables differ (only in PostgreSQL: {missing or 'none'}; "
            f"only in SQLite: {extra or 'none'}): this watcher cannot migrate this store"
        )
    return cols


def _converted(
    table: str, cols: list[tuple[str, str]], row: sqlite3.Row, folders: dict[str, tuple[str, bool]]
) -> tuple[Any, ...]:
    """A SQLite row as the PostgreSQL table takes it."""
    out: list[Any] = []
    for name, kind in cols:
        value = row[DERIVED.get((table, name), name)]
        if name == "folder_id":
            value = folders.get(str(value), (str(value), False))[0]
        elif kind == "bytea" and value is not None:
            value = os.fsencode(str(value))
        elif kind == "boolean" and value is not None:
            value = bool(value)
        out.append(value)
    return tuple(out)


def _copy_table(
    conn: psycopg.Connection[Any], source: sqlite3.Connection, table: str, folders: dict[str, tuple[str, bool]]
) -> tuple[int, int]:
    """Copy one table (COPY, streamed); its (rows, checksum) as read from the source."""
    cols = _columns(conn, source, table)
    kinds = [kind for _, kind in cols]
    n, total = 0, 0
    names = ", ".join(name for name, _ in cols)
    with conn.cursor().copy(f"COPY {table} ({names}) FROM STDIN") as copy:
        for row in source.execute(f"SELECT * FROM {table}"):
            values = _converted(table, cols, row, folders)
            copy.write_row(values)
            n += 1
            total = (total + _digest(kinds, values)) % _MOD
    return n, total


def _digest(kinds: list[str], values: Iterable[Any]) -> int:
    """One row's digest, its values in a canonical form (bytes as hex, numbers by their column's type)."""
    canon: list[Any] = []
    for kind, v in zip(kinds, values, strict=True):
        if v is None:
            canon.append(None)
        elif kind == "bytea":
            canon.append(bytes(v).hex())
        elif kind == "boolean":
            canon.append(bool(v))
        elif kind in ("double precision", "real"):
            canon.append(float(v).hex())
        elif kind in ("integer", "bigint", "smallint"):
            canon.append(int(v))
        else:
            canon.append(str(v))
    return int.from_bytes(hashlib.sha256(json.dumps(canon).encode()).digest(), "big")


def _set_sequences(conn: psycopg.Connection[Any], tables: Iterable[str]) -> None:
    """Each serial ``id`` goes on after the highest copied ID (new rows never take an ID that is referenced)."""
    for table in tables:
        row = conn.execute(
            "SELECT pg_get_serial_sequence(%s, 'id') FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = %s AND column_name = 'id'",
            (table, table),
        ).fetchone()
        if row is not None and row[0] is not None:
            conn.execute(
                f"SELECT setval(%s, GREATEST(COALESCE(MAX(id), 0), 1), MAX(id) IS NOT NULL) FROM {table}", (row[0],)
            )


def checksum(conn: psycopg.Connection[Any], table: str) -> tuple[int, int]:
    """(rows, checksum) of a table as the target holds it, computed as :func:`_copy_table` did for the source."""
    cols = [
        (str(r[0]), str(r[1]))
        for r in conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = %s ORDER BY ordinal_position",
            (table,),
        )
    ]
    kinds = [kind for _, kind in cols]
    n, total = 0, 0
    with conn.cursor(name=f"verify_{table}") as cur:
        cur.execute(f"SELECT {', '.join(name for name, _ in cols)} FROM {table}")
        for row in cur:
            n += 1
            total = (total + _digest(kinds, row)) % _MOD
    return n, total


def _verify(conn: psycopg.Connection[Any], made: dict[str, tuple[int, int]], where: str) -> None:
    """Every table's count and checksum in the target equal the source's, or nothing is kept."""
    for table, (rows, total) in made.items():
        found, got = checksum(conn, table)
        if (found, got) != (rows, total):
            raise ConfigError(
                f"nothing was kept in {where} (the copy was rolled back): its {table} table does not match the "
                f"SQLite store ({found} row(s), checksum {got:064x} for {rows} row(s), {total:064x}); "
                "the folders stay with the SQLite store; run the migration again"
            )


def _verify_counts(conn: psycopg.Connection[Any], source: sqlite3.Connection, where: str) -> None:
    """The counts the new store's triggers kept as rows came in equal the SQLite store's, or nothing is kept."""
    theirs = {(str(p), str(s)): int(n) for p, s, n in source.execute("SELECT pipeline, state, n FROM job_counts")}
    ours = {
        (str(p), str(s)): int(n)
        for p, s, n in conn.execute("SELECT pipeline, state, SUM(n) FROM job_counts GROUP BY pipeline, state")
    }
    if {k: n for k, n in ours.items() if n} != {k: n for k, n in theirs.items() if n}:
        raise ConfigError(
            f"nothing was kept in {where} (the copy was rolled back): the jobs counted per state ({ours}) do not "
            f"match the SQLite store's ({theirs}); run the migration again"
        )


def _switch(settings: Settings, folders: dict[str, tuple[str, bool]], migrated: Migrated, where: str, say: Say) -> None:
    """Hand each of the SQLite store's folders to the new store (keeping its folder ID); say what is left alone."""
    for folder, (_, ours) in sorted(folders.items()):
        if not ours:
            if os.path.isdir(folder):
                migrated.left[folder] = "not this store's (or not writable): its marker is left as it is"
            continue
        try:
            markers.adopt(Path(folder), migrated.store_id, settings.store.node_name)
        except OSError as exc:
            migrated.left[folder] = f"its marker could not be written ({exc.strerror}): `watcher adopt` it"
            continue
        migrated.switched.append(folder)
    for folder in migrated.switched:
        say(f"  {display(folder)}: now owned by {migrated.store_id}")
    for folder, why in migrated.left.items():
        say(f"  {display(folder)}: {why}")
    say(
        f'done. Set [store] url = "{where}" in the config of every machine (a password goes in a passfile), then '
        "start the daemons. The SQLite store keeps its rows, but its daemon no longer owns these folders."
    )
