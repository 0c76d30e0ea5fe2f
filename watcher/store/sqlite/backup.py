"""Copies of the SQLite store: `watcher store backup` and `restore`, the automatic copy made before each schema
migration, and the guard that keeps a binary from opening a store newer than it knows.

Copies go through SQLite's online backup API (``sqlite3.Connection.backup``): consistent while a daemon writes,
WAL included. A restore writes into the store through the same API, only while no daemon holds the state
folder's lock, and only from a file that passes ``PRAGMA integrity_check`` and is a watcher store this binary
knows. PostgreSQL has its own tools: :func:`postgres_commands` says which lines to run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import sqlite3
from pathlib import Path

import structlog

from watcher.errors import ConfigError
from watcher.store.rules import too_new

log = structlog.get_logger("watcher.store")
KEEP = 3  # automatic copies kept in the state folder's backups/ (the newest)
_AUTOMATIC = re.compile(r"watcher-v\d+-\d{8}T\d+Z\.db")  # the copies made before migrations (rotated)
TABLES = {"files", "jobs", "results", "operations"}  # what makes a file a watcher store


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")


def _copy(source: sqlite3.Connection, dest: Path) -> None:
    """``source``'s database into a new file ``dest`` (through a temp file beside it, then renamed)."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        target = sqlite3.connect(tmp)
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
        finally:
            target.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def backup(store: Path, dest: Path) -> Path:
    """`watcher store backup PATH`: a consistent copy of the store at ``store`` in the new file ``dest`` (or in
    the folder ``dest``, named after its schema version and the time); safe while a daemon runs."""
    if not store.exists():
        raise ConfigError(f"no store at {store}: nothing to back up")
    source = sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        if dest.is_dir():
            version = source.execute("PRAGMA user_version").fetchone()[0]
            dest = dest / f"watcher-v{version}-{_stamp()}.db"
        if dest.exists():
            raise ConfigError(f"{dest} exists already: give a new file name (a backup never overwrites a file)")
        if not dest.parent.is_dir():
            raise ConfigError(f"{dest.parent} is not a folder: create it, or give another PATH")
        _copy(source, dest)
    finally:
        source.close()
    return dest


def check_backup(path: Path, known: int) -> int:
    """The schema version of the watcher store in the file ``path``; ConfigError naming the file and the cause
    when it is not one (unreadable, damaged, another database, or newer than this binary knows)."""
    if not path.is_file():
        raise ConfigError(f"{path} is not a file: nothing was restored")
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            verdict = [r[0] for r in db.execute("PRAGMA integrity_check")]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{path} is not a watcher store ({exc}): nothing was restored") from None
    if verdict != ["ok"]:
        raise ConfigError(f"{path} is damaged (integrity check: {'; '.join(verdict[:3])}): nothing was restored")
    if not tables >= TABLES or version < 1:
        raise ConfigError(f"{path} is an SQLite database but not a watcher store: nothing was restored")
    if version > known:
        raise too_new(str(path), version, known)
    return version


def restore(source: Path, store: Path, known: int) -> tuple[int, Path | None]:
    """`watcher store restore PATH`: the store at ``store`` becomes the copy in ``source``. The caller holds the
    state folder's lock (no daemon runs). The store replaced is kept first in backups/ (its copy is returned).
    A copy of an older schema is migrated when a daemon next opens it."""
    version = check_backup(source, known)
    kept = None
    if store.exists():
        current = sqlite3.connect(store, timeout=30)
        try:
            old = current.execute("PRAGMA user_version").fetchone()[0]
            folder = store.parent / "backups"
            folder.mkdir(exist_ok=True)
            kept = folder / f"watcher-v{old}-before-restore-{_stamp()}.db"
            _copy(current, kept)
        finally:
            current.close()
    src = sqlite3.connect(f"{source.as_uri()}?mode=ro", uri=True)
    dest = sqlite3.connect(store, timeout=30)
    try:
        src.backup(dest)
    finally:
        dest.close()
        src.close()
    log.info("store.restored", store=str(store), source=str(source), schema=version, previous=str(kept or ""))
    return version, kept


def before_migration(db: sqlite3.Connection, store: Path, version: int) -> Path:
    """The automatic copy of a store of schema ``version`` about to be migrated, in the state folder's backups/
    as ``watcher-v<version>-<time>.db``; only the newest :data:`KEEP` copies are kept."""
    folder = store.parent / "backups"
    dest = folder / f"watcher-v{version}-{_stamp()}.db"
    try:
        folder.mkdir(exist_ok=True)
        _copy(db, dest)
    except (OSError, sqlite3.Error) as exc:
        raise OSError(
            f"cannot keep a copy of the store in {folder} before migrating it from schema version {version} "
            f"({exc}); the store was not changed: free space there, or make it writable, and start again"
        ) from exc
    copies = sorted(
        (p for p in folder.glob("watcher-v*.db") if _AUTOMATIC.fullmatch(p.name)), key=lambda p: p.name.rsplit("-")[-1]
    )
    for old in copies[:-KEEP]:
        with contextlib.suppress(OSError):
            old.unlink()
    log.info("store.backed_up", store=str(store), backup=str(dest), schema=version, next="migrating the schema")
    return dest


def postgres_commands(url: str, path: Path, *, restoring: bool) -> list[str]:
    """The lines a user runs to back up or restore a PostgreSQL store (``url`` shown without its password)."""
    if restoring:
        return [
            "# stop every daemon that uses this store first, then:",
            f"pg_restore --clean --if-exists --no-owner --dbname '{url}' '{path}'",
        ]
    return [f"pg_dump --format=custom --file '{path}' '{url}'"]
