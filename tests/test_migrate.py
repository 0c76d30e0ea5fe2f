"""`watcher store migrate`: a SQLite store grows into PostgreSQL without paying for anything again.

Real daemons against the emulator: a library analysed and archived on SQLite, the daemon stopped, the store
migrated into the test's own database, a daemon started on PostgreSQL over the same folder; the emulator's bill,
`watcher spend` and the new store's rows say what happened. Then the refusals: a dry run changes nothing, a
non-empty database, a running daemon and a copy that does not verify are refused, and leave the folders as
they were.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import psycopg
import pytest

from tests.conftest import wait_for
from tests.test_archive import archive_settings
from tests.test_durable import analyse_library, emu  # noqa: F401  (a fixture)
from tests.test_paid_once import cli
from watcher import clidirect, markers
from watcher.errors import ConfigError, StartupError
from watcher.migrate import migrate, not_empty
from watcher.statelock import StateLock

pytestmark = pytest.mark.timeout(150)


def on_postgres(settings, url: str):
    """The same settings with the store in PostgreSQL at ``url``."""
    return settings.model_copy(update={"store": settings.store.model_copy(update={"url": url})})


def rows(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def done(url: str, pipeline: str) -> int:
    return int(rows(url, f"SELECT COUNT(*) FROM jobs WHERE pipeline='{pipeline}' AND state='done'")[0][0])


def spend_text(settings, capsys) -> str:
    """What `watcher spend` prints for today, as a table and as CSV."""
    day = dt.datetime.now(dt.UTC).date().isoformat()
    capsys.readouterr()
    clidirect.cmd_spend(settings, day, day, as_csv=False)
    clidirect.cmd_spend(settings, day, day, as_csv=True)
    return str(capsys.readouterr().out)


def test_a_migrated_store_goes_on_in_postgres_and_pays_nothing_again(tmp_path, inbox, emu, run_daemon, pg_url, capsys):  # noqa: F811
    """Four files analysed and archived on SQLite; stop, migrate, start on PostgreSQL over the same folder: 0 new
    requests, the same `watcher spend`, the folder worked on (a copy of a file is done from the migrated store)."""
    settings = archive_settings(tmp_path, inbox, emu, versions=("original", "mastered"))
    analyse_library(tmp_path, inbox, settings, run_daemon, archived=True)
    billed = emu.paid()
    spent = spend_text(settings, capsys)
    assert "paid request(s)" in spent
    folder_id = markers.read_marker(inbox)["folder_id"]  # type: ignore[index]
    said: list[str] = []
    migrated = migrate(settings, pg_url, say=said.append)
    assert migrated.counts["files"] == 4 and migrated.counts["jobs"] == 8 and migrated.counts["ledger"] >= 4 * 2
    assert migrated.switched == [str(inbox)] and not migrated.left
    marker = markers.read_marker(inbox) or {}
    assert (marker["store"], marker["folder_id"]) == (migrated.store_id, folder_id)
    assert rows(pg_url, "SELECT COUNT(*) FROM ledger")[0][0] == migrated.counts["ledger"]
    assert any("daemons stopped" in line or "every daemon stopped" in line for line in said)
    pg = on_postgres(settings, pg_url)
    assert spend_text(pg, capsys) == spent  # the ledger intact
    d = run_daemon(pg)
    shutil.copy(inbox / "a.wav", tmp_path / "copy.wav")
    shutil.move(tmp_path / "copy.wav", inbox / "copy.wav")
    wait_for(lambda: done(pg_url, "archive") == 5 and done(pg_url, "analyze") == 5, timeout=40, what="the copy done")
    d.stop()
    assert emu.paid() == billed  # not one request more
    assert rows(pg_url, "SELECT COUNT(*) FROM files")[0][0] == 5  # the four known ones were not registered again
    assert (tmp_path / "out" / "copy" / "manifest.json").exists()
    assert spend_text(pg, capsys) == spent
    # new rows take IDs after the copied ones
    assert rows(pg_url, "SELECT MAX(id) FROM files")[0][0] == 5


def small_library(tmp_path: Path, inbox: Path, emu, run_daemon):  # noqa: F811
    settings = archive_settings(tmp_path, inbox, emu, versions=("original",))
    analyse_library(tmp_path, inbox, settings, run_daemon, archived=True)
    return settings


def test_a_dry_run_prints_the_counts_and_changes_nothing(tmp_path, inbox, emu, run_daemon, pg_url):  # noqa: F811
    """`--dry-run` through the real command: counts per table, no schema made, the marker untouched; a
    password in the URL is never printed."""
    small_library(tmp_path, inbox, emu, run_daemon)
    marker = (inbox / markers.MARKER).read_bytes()
    secret = pg_url.replace("postgres@", "postgres:s3cret-pw@")
    run = cli(tmp_path, "store", "migrate", "--to", secret, "--dry-run")
    assert run.returncode == 0, run.stderr
    assert "files: 4 row(s)" in run.stdout and "ledger:" in run.stdout and "nothing was changed" in run.stdout
    assert "s3cret-pw" not in run.stdout + run.stderr
    assert rows(pg_url, "SELECT COUNT(*) FROM pg_tables WHERE schemaname = current_schema()")[0][0] == 0
    assert (inbox / markers.MARKER).read_bytes() == marker


def test_a_database_that_is_not_empty_is_refused(tmp_path, inbox, emu, run_daemon, pg_url, pg_cluster):  # noqa: F811
    """Another application's table, or a watcher store with rows: refused, nothing copied, the folder kept; and a
    store migrated once is not copied again, to the same database or another (an old fork of the new store)."""
    settings = small_library(tmp_path, inbox, emu, run_daemon)
    marker = (inbox / markers.MARKER).read_bytes()
    rows(pg_url, "CREATE TABLE invoices (id integer)")
    with pytest.raises(ConfigError, match=r"holds other tables \(invoices\)"):
        migrate(settings, pg_url, say=lambda _: None)
    rows(pg_url, "DROP TABLE invoices")
    migrate(settings, pg_url, say=lambda _: None)
    moved = (inbox / markers.MARKER).read_bytes()
    assert moved != marker
    for target in (pg_url, pg_cluster.database()):  # a second time: the folder and its work are the new store's
        run = cli(tmp_path, "store", "migrate", "--to", target)
        assert run.returncode == 2 and "this store was migrated to" in run.stderr, run.stderr
        assert "remove" in run.stderr and "migrated-to.json" in run.stderr
    assert (inbox / markers.MARKER).read_bytes() == moved
    (tmp_path / "state" / "migrated-to.json").unlink()  # the user says so: a copy anyway, refused by the target
    run = cli(tmp_path, "store", "migrate", "--to", pg_url)
    assert run.returncode == 2 and "holds a watcher store already" in run.stderr, run.stderr


def test_a_running_daemon_is_refused(tmp_path, inbox, emu, run_daemon, pg_url):  # noqa: F811
    """While a daemon holds the state folder the migration refuses, saying so; nothing is made in the database."""
    settings = small_library(tmp_path, inbox, emu, run_daemon)
    d = run_daemon(settings)
    wait_for(lambda: StateLock.holder(tmp_path / "state"), what="the daemon holding the state folder")
    try:
        with pytest.raises(StartupError, match=r"nothing was copied: the state folder .* is in use by"):
            migrate(settings, pg_url, say=lambda _: None)
        run = cli(tmp_path, "store", "migrate", "--to", pg_url)
        assert run.returncode == 3 and "stop that watcher first" in run.stderr, run.stderr
        said: list[str] = []  # a dry run is a preview: it says the daemon must be stopped first
        assert migrate(settings, pg_url, dry_run=True, say=said.append).counts["files"] == 4
        assert "stop it before the migration itself" in said[0]
    finally:
        d.stop()
    assert rows(pg_url, "SELECT COUNT(*) FROM pg_tables WHERE schemaname = current_schema()")[0][0] == 0
    assert json.loads((inbox / markers.MARKER).read_text())["store"].startswith("sqlite:")


def test_a_copy_that_does_not_verify_is_rolled_back(tmp_path, inbox, emu, run_daemon, pg_url):  # noqa: F811
    """A row changed between the copy and its check (a hook): refused, the target left empty, the folder still the
    SQLite store's; the migration run again succeeds."""
    settings = small_library(tmp_path, inbox, emu, run_daemon)
    marker = (inbox / markers.MARKER).read_bytes()

    def tamper(conn: psycopg.Connection) -> None:
        conn.execute("UPDATE ledger SET seconds = seconds + 1 WHERE id = (SELECT MIN(id) FROM ledger)")

    with pytest.raises(ConfigError, match="its ledger table does not match the SQLite store"):
        migrate(settings, pg_url, say=lambda _: None, tamper=tamper)
    with psycopg.connect(pg_url) as conn:
        assert not_empty(conn) is None
    assert rows(pg_url, "SELECT COUNT(*) FROM ledger")[0][0] == 0
    assert (inbox / markers.MARKER).read_bytes() == marker
    migrated = migrate(settings, pg_url, say=lambda _: None)
    assert migrated.switched == [str(inbox)]
