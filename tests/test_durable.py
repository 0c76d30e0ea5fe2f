"""Nothing paid is ever lost: a new store adopts the sidecars and deliveries on disk instead of paying again.

Real daemons against the emulator: a library analysed (and archived), its state folder deleted as on a new
machine, `watcher adopt`, a restart; the emulator's bill says what was asked again.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import API_KEY, make_settings, query, wait_for, write_tone
from tests.test_archive import PKEY, archive_settings, wait_delivery
from tests.test_multinode import Node
from tests.test_paid_once import cli
from watcher import commands
from watcher.emulator import Emulator
from watcher.pipelines.adopt import paid_ids
from watcher.pipelines.sidecar import schema
from watcher.status import render
from watcher.store import Operation

pytestmark = pytest.mark.timeout(120)
NAMES = ("a", "b", "c", "d")


@pytest.fixture
def emu():
    with Emulator(analysis_key=API_KEY, processing_key=PKEY, use_local=False) as e:
        e.processing.faults.polls_needed = 1
        yield e


def sidecar(audio: Path) -> Path:
    return audio.with_name(audio.name + ".analysis.json")


def jobs_done(tmp_path: Path, pipeline: str) -> int:
    row = query(tmp_path, "SELECT COUNT(*) FROM jobs WHERE pipeline=? AND state='done'", pipeline)
    return int(row[0]) if row else 0


def analyse_library(tmp_path: Path, inbox: Path, settings, run_daemon, *, archived: bool = False) -> None:
    """Four files dropped and finished by a daemon, which is then stopped."""
    d = run_daemon(settings)
    for n, name in enumerate(NAMES):
        write_tone(inbox / f"{name}.wav", 0.3, freq=220 + 110 * n)
    for name in NAMES:
        wait_for(sidecar(inbox / f"{name}.wav").exists, what=f"{name}'s sidecar")
        if archived:
            wait_delivery(tmp_path, name)
    wait_for(lambda: jobs_done(tmp_path, "analyze") == 4, what="four analyses done")
    if archived:
        wait_for(lambda: jobs_done(tmp_path, "archive") == 4, what="four archives done")
    d.stop()


def lose_the_store(tmp_path: Path, inbox: Path, settings) -> None:
    """The state folder is gone (a new machine); the user adopts the watched folder as the product says.

    It is moved out of the daemon's sight rather than deleted: the bill spans both lives, and the first life's
    ledger is what it is held against (the check after each test reads every store under the test's folder)."""
    lost = sum(1 for _ in tmp_path.glob("lost-state-*"))
    (tmp_path / "state").rename(tmp_path / f"lost-state-{lost}")
    commands.adopt(settings, inbox)


def test_a_lost_store_adopts_every_sidecar_and_pays_nothing(tmp_path, inbox, emu, run_daemon):
    """Four files analysed, the store lost, `watcher adopt`, a restart: 0 new requests, sidecars untouched."""
    settings = make_settings(tmp_path, inbox, emu.url)
    analyse_library(tmp_path, inbox, settings, run_daemon)
    billed = emu.paid()
    assert sum(billed.values()) == 4 * 3  # four files, three models each
    before = {name: sidecar(inbox / f"{name}.wav").read_bytes() for name in NAMES}
    for name in NAMES:
        doc = json.loads(before[name])
        assert doc["schema_minor"] >= 1 and doc["backend"]["account"] not in ("", "none", API_KEY)
        jsonschema.validate(doc, schema())
    lose_the_store(tmp_path, inbox, settings)
    d = run_daemon(settings)
    wait_for(lambda: jobs_done(tmp_path, "analyze") == 4, what="four adopted analyses")
    d.stop()
    assert emu.paid() == billed  # not one request more
    assert {name: sidecar(inbox / f"{name}.wav").read_bytes() for name in NAMES} == before
    report = commands.status(settings)
    assert report["adopted"] == {"analyze": 4, "archive": 0}
    assert "adopted from sidecars: 4 analysed" in render(report)
    # the adopted results are the store's now: a copy of one file is answered from it, with no request
    shutil.copy(inbox / "a.wav", tmp_path / "copy.wav")
    shutil.move(tmp_path / "copy.wav", inbox / "copy.wav")
    d = run_daemon(settings)
    wait_for(lambda: jobs_done(tmp_path, "analyze") == 5, what="the copy's analysis")
    d.stop()
    assert emu.paid() == billed


@pytest.mark.bill_exempt("a new store that does not trust a sidecar pays again on purpose: each life's ledger "
                        "holds its own first send, which the check would take for an unreported re-send")
def test_sidecars_of_other_content_endpoint_or_account_are_not_trusted(tmp_path, inbox, emu, run_daemon):
    """A sidecar for another account, another endpoint or other content is never adopted (its file is asked
    again); one written before accounts were recorded is trusted for the same endpoint."""
    settings = make_settings(tmp_path, inbox, emu.url)
    analyse_library(tmp_path, inbox, settings, run_daemon)
    billed = sum(emu.paid().values())

    def edit(name: str, change) -> None:
        path = sidecar(inbox / f"{name}.wav")
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))

    edit("a", lambda doc: doc["backend"].update(account="0123456789ab"))  # paid with another key
    edit("b", lambda doc: doc["backend"].update(base_url="https://elsewhere.invalid"))  # another endpoint
    edit("c", lambda doc: doc["source"].update(sha256="0" * 64))  # about other content
    edit("d", lambda doc: (doc["backend"].pop("account"), doc.pop("schema_minor")))  # written before 1.1
    lose_the_store(tmp_path, inbox, settings)
    d = run_daemon(settings)
    wait_for(lambda: jobs_done(tmp_path, "analyze") == 4, what="four analyses")
    d.stop()
    assert sum(emu.paid().values()) == billed + 3 * 3  # a, b and c asked again, d adopted
    assert commands.status(settings)["adopted"]["analyze"] == 1
    for name in ("a", "b", "c"):  # rewritten from the new answers, for this endpoint and account
        doc = json.loads(sidecar(inbox / f"{name}.wav").read_text())
        assert doc["backend"]["base_url"] == emu.url and doc["backend"]["account"] != "0123456789ab"


@pytest.mark.bill_exempt("its last part damages a delivery and loses the store again, so a new store pays again on "
                        "purpose; the first part asserts the bill is unchanged by adoption itself")
def test_a_lost_store_adopts_verified_deliveries(tmp_path, inbox, emu, run_daemon):
    """Archive on, deliveries in place, the store lost: no upload, no processing request, no analysis; a
    delivery whose file no longer matches its manifest is made again."""
    settings = archive_settings(tmp_path, inbox, emu, versions=("original", "mastered"))
    analyse_library(tmp_path, inbox, settings, run_daemon, archived=True)
    billed = emu.paid()
    assert billed[next(k for k in billed if k[1] == "upload")] == 1
    lose_the_store(tmp_path, inbox, settings)
    d = run_daemon(settings)
    wait_for(lambda: jobs_done(tmp_path, "archive") == 4, what="four adopted deliveries")
    wait_for(lambda: jobs_done(tmp_path, "analyze") == 4, what="four adopted analyses")
    d.stop()
    assert emu.paid() == billed
    report = commands.status(settings)
    assert report["adopted"] == {"analyze": 4, "archive": 4}
    (entry,) = [f for f in report["files"] if f["path"].endswith("a.wav")]
    assert entry["jobs"]["archive"]["versions"] == {"original": "delivered", "mastered": "delivered"}
    # a delivered file damaged since: that delivery is not trusted, the file is processed again
    manifest = json.loads((tmp_path / "out" / "b" / "manifest.json").read_text())
    damaged = tmp_path / "out" / "b" / manifest["files"][0]["path"]
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\x01")
    lose_the_store(tmp_path, inbox, settings)
    d = run_daemon(settings)
    wait_for(lambda: jobs_done(tmp_path, "archive") == 4, timeout=40, what="four archives")
    d.stop()
    assert sum(emu.paid().values()) > sum(billed.values())
    assert commands.status(settings)["adopted"]["archive"] == 3


# -- copies of the store, and a binary that meets a store newer than it knows ------------------------------


def files_in(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM files").fetchone()[0])
    finally:
        conn.close()


def test_backup_and_restore_round_trip(tmp_path, inbox, emu, run_daemon):
    """A backup taken while the daemon runs restores the store as it was; a restore is refused while the daemon
    holds the state folder, and from a file that is not a watcher store."""
    settings = make_settings(tmp_path, inbox, emu.url)
    d = run_daemon(settings)
    write_tone(inbox / "a.wav", 0.3)
    wait_for(lambda: jobs_done(tmp_path, "analyze") == 1, what="a analysed")
    copy = tmp_path / "copies" / "store.db"
    copy.parent.mkdir()
    made = cli(tmp_path, "store", "backup", str(copy))
    assert made.returncode == 0, made.stderr
    assert files_in(copy) == 1 and "a copy of the store" in made.stdout
    again = cli(tmp_path, "store", "backup", str(copy))
    assert again.returncode == 2 and "exists already" in again.stderr  # a backup never overwrites
    refused = cli(tmp_path, "store", "restore", str(copy))
    assert refused.returncode == 3 and "nothing was restored" in refused.stderr and "in use" in refused.stderr
    write_tone(inbox / "b.wav", 0.3, freq=660)
    wait_for(lambda: jobs_done(tmp_path, "analyze") == 2, what="b analysed")
    d.stop()
    store = tmp_path / "state" / "watcher.db"
    assert files_in(store) == 2
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    junk = cli(tmp_path, "store", "restore", str(tmp_path / "junk.db"))
    assert junk.returncode == 2 and "junk.db" in junk.stderr and "not a watcher store" in junk.stderr
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE t (x)")
    other.close()
    wrong = cli(tmp_path, "store", "restore", str(tmp_path / "other.db"))
    assert wrong.returncode == 2 and "not a watcher store" in wrong.stderr
    assert files_in(store) == 2  # the refusals changed nothing
    done = cli(tmp_path, "store", "restore", str(copy))
    assert done.returncode == 0, done.stderr
    assert files_in(store) == 1
    (kept,) = (tmp_path / "state" / "backups").glob("watcher-v*-before-restore-*.db")
    assert files_in(kept) == 2
    assert commands.status(settings)["counts"]["analyze"] == {"done": 1}


def old_store(path: Path, version: int) -> None:
    """A store as release ``version`` of the schema left it, with one file recorded."""
    from watcher.store.sqlite.schema import SCHEMA

    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    for script in SCHEMA[:version]:
        db.executescript(script)
    db.executescript(
        f"""
        PRAGMA user_version = {version};
        INSERT INTO files VALUES (1, '/in', '/in/a.wav', 'a.wav', 10, 1, 7, 'ab', 1, 0);
        """
    )
    db.close()


def test_a_migration_is_preceded_by_a_backup_and_three_are_kept(tmp_path):
    """Opening a store of an older schema copies it to backups/watcher-v<old>-<time>.db first; the last 3 stay."""
    from watcher.store import Store
    from watcher.store.sqlite.schema import SCHEMA

    path = tmp_path / "state" / "watcher.db"
    for _ in range(4):
        old_store(path, 5)
        Store(path).close()
    copies = sorted((tmp_path / "state" / "backups").iterdir())
    assert len(copies) == 3 and all(c.name.startswith("watcher-v5-") for c in copies)
    for c in copies:
        conn = sqlite3.connect(c)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
        assert conn.execute("SELECT path FROM files").fetchall() == [("/in/a.wav",)]
        conn.close()
    Store(path).close()  # a store already current is not copied again
    assert len(list((tmp_path / "state" / "backups").iterdir())) == 3
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(SCHEMA)
    conn.close()


def test_a_store_newer_than_the_binary_is_refused_with_both_versions(tmp_path, inbox):
    """A SQLite store whose schema is newer than this watcher knows: `run` and `status` exit 2 naming both
    versions, and the store is left as it was."""
    from watcher.store import Store
    from watcher.store.rules import StoreTooNew
    from watcher.store.sqlite.schema import SCHEMA

    path = tmp_path / "state" / "watcher.db"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(SCHEMA) + 1}")
    conn.close()
    for args in (("status",), ("run", str(inbox))):
        done = cli(tmp_path, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert f"schema version {len(SCHEMA) + 1}" in done.stderr and f"up to {len(SCHEMA)}" in done.stderr
    with pytest.raises(StoreTooNew):
        Store(path, readonly=True)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(SCHEMA) + 1
    conn.close()
    assert not (tmp_path / "state" / "backups").exists()


def test_a_postgres_store_newer_than_the_binary_is_refused(tmp_path, pg_url):
    """The same guard on PostgreSQL: the schema_version above the known one is refused, both versions named;
    `watcher store backup` prints the pg_dump line to run, without a password."""
    import psycopg

    from watcher.store.postgres import PostgresStore
    from watcher.store.postgres.schema import SCHEMA
    from watcher.store.rules import StoreTooNew

    PostgresStore(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (len(SCHEMA) + 1,))
    for readonly in (False, True):
        with pytest.raises(StoreTooNew) as refused:
            PostgresStore(pg_url, readonly=readonly)
        assert f"schema version {len(SCHEMA) + 1}" in str(refused.value) and f"up to {len(SCHEMA)}" in str(
            refused.value
        )
    done = cli(tmp_path, "status", store__url=pg_url)
    assert done.returncode == 2 and f"schema version {len(SCHEMA) + 1}" in done.stderr
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (len(SCHEMA),))
    lines = cli(tmp_path, "store", "backup", str(tmp_path / "dump.pgc"), store__url=pg_url)
    assert lines.returncode == 0 and "pg_dump --format=custom" in lines.stdout and "dump.pgc" in lines.stdout


def test_one_endpoint_spelled_another_way_pays_nothing_again(tmp_path, inbox, emu, run_daemon):
    """The library analysed at ``http://127.0.0.1:PORT``; the config then names the same server ``localhost``, in
    capitals, with a trailing slash: its results are found (0 requests), and a lost store still adopts the
    sidecars written under the first spelling."""
    settings = make_settings(tmp_path, inbox, emu.url)
    analyse_library(tmp_path, inbox, settings, run_daemon)
    billed = emu.paid()
    port = emu.url.rsplit(":", 1)[1]
    respelled = make_settings(tmp_path, inbox, f"HTTP://LocalHost:{port}//")
    shutil.copy(inbox / "a.wav", tmp_path / "copy.wav")
    shutil.move(tmp_path / "copy.wav", inbox / "copy.wav")
    d = run_daemon(respelled)
    wait_for(lambda: jobs_done(tmp_path, "analyze") == 5, what="the copy's analysis")
    d.stop()
    assert emu.paid() == billed
    lose_the_store(tmp_path, inbox, respelled)
    d = run_daemon(respelled)
    wait_for(lambda: jobs_done(tmp_path, "analyze") == 5, what="five adopted analyses")
    d.stop()
    assert emu.paid() == billed
    # a.wav and its copy hold one content: whichever is claimed second finds the first's adopted results
    assert commands.status(respelled)["adopted"]["analyze"] in (4, 5)


# -- a store lost in the middle of processing ---------------------------------------------------------------


def recorded(audio: Path, wanted: set[str]) -> bool:
    """True once the file's sidecar holds its complete analysis and the processing IDs of ``wanted``."""
    try:
        doc = json.loads(sidecar(audio).read_text())
    except (OSError, ValueError):
        return False
    return bool(doc.get("complete")) and set(doc.get("archive", {}).get("paid", {}).get("operations", {})) == wanted


def test_a_store_lost_mid_processing_resumes_from_the_sidecars(tmp_path, inbox, emu):
    """A real daemon killed (SIGKILL) while the service holds the processing, its state folder lost, `watcher adopt`,
    a restart: one upload and one processing request per version, and every delivery completes."""
    emu.processing.faults.polls_by_kind["mastered"] = 10**6  # the service holds the masterings "in progress"
    config = tmp_path / "watcher.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[[folders]]\npath = "{inbox}"\nsettle_seconds = 0.3\nrescan_interval = 3600\n'
        f'[analysis]\nbackend = "remote"\nbase_url = "{emu.url}"\napi_key = "{API_KEY}"\n'
        f'[archive]\nenabled = true\nbase_url = "{emu.url}"\napi_key = "{PKEY}"\noutput_dir = "{tmp_path / "out"}"\n'
        'poll_initial = 0.05\npoll_max = 0.2\nversions = ["original", "mastered"]\n'
        "[retry]\nbackoff_initial = 0.2\nbackoff_max = 1.0\n"
    )
    first = Node(tmp_path, "first", config)
    try:
        for n, name in enumerate(NAMES[:2]):
            write_tone(inbox / f"{name}.wav", 0.3, freq=220 + 110 * n)
        for name in NAMES[:2]:
            wait_for(lambda name=name: recorded(inbox / f"{name}.wav", {"audio", "mastered"}), timeout=30, what=name)
            jsonschema.validate(json.loads(sidecar(inbox / f"{name}.wav").read_text()), schema())
    finally:
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    billed = emu.paid()
    assert sorted(op for _, op in billed if not op.startswith("analyze")) == ["master", "master", "upload", "upload"]
    assert set(billed.values()) == {1}
    # the state folder is lost (moved out of sight: the bill spans both lives, held against the first one's ledger)
    (tmp_path / "state").rename(tmp_path / "lost-state-0")
    adopt = subprocess.run(
        [sys.executable, "-m", "watcher", "--config", str(config), "adopt", str(inbox)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert adopt.returncode == 0, adopt.stderr
    emu.processing.faults.polls_by_kind.clear()  # the service finishes
    second = Node(tmp_path, "second", config)
    try:
        for name in NAMES[:2]:
            manifest = wait_delivery(tmp_path, name, timeout=40)
            assert set(manifest["versions"]) == {"original", "mastered"}
    finally:
        assert second.stop() == 0
    assert emu.paid() == billed  # not one upload, processing request or analysis more
    log = (tmp_path / "second.log").read_text()
    assert log.count('"archive.resumed"') == 2 and '"archive.upload_started"' not in log
    for name in NAMES[:2]:  # the finished sidecar says where the delivery is; the record of work in progress is gone
        archive = json.loads(sidecar(inbox / f"{name}.wav").read_text())["archive"]
        assert archive["versions"] == {"original": "delivered", "mastered": "delivered"} and "paid" not in archive


def test_a_record_of_processing_is_trusted_only_for_its_content_service_account_and_parameters():
    """The IDs of `archive.paid` are taken only for the same content (sha256 and size), the same endpoint and
    account, the same operation and parameters; and never without the upload's."""
    where = "processing http://127.0.0.1:1 account:aaaaaaaaaaaa"
    sha = "ab" * 32
    ops = {"audio": Operation(sha, where, "upload", "p0", "reask"), "mastered": Operation(sha, where, "master", "p1")}

    def doc(**change) -> dict:
        paid = {
            "service": where,
            "sha256": sha,
            "size": 10,
            "operations": {
                "audio": {"operation": "upload", "params": "p0", "id": "u-1"},
                "mastered": {"operation": "master", "params": "p1", "id": "m-1"},
            },
        }
        paid.update(change)
        return {"source": {"sha256": sha, "size": 10}, "archive": {"paid": paid}}

    def ids(d: dict) -> dict:
        return paid_ids(d, sha256=sha, size=10, ops=ops)

    assert ids(doc()) == {"audio": "u-1", "mastered": "m-1"}
    assert ids(doc(service=where.replace("aaaa", "bbbb"))) == {}  # another account
    assert ids(doc(service="processing http://elsewhere:1 account:aaaaaaaaaaaa")) == {}  # another endpoint
    assert ids(doc(sha256="cd" * 32)) == {} and ids(doc(size=11)) == {}  # other content
    other = doc()
    other["archive"]["paid"]["operations"]["mastered"]["params"] = "p9"  # mastered with other parameters
    assert ids(other) == {"audio": "u-1"}
    del other["archive"]["paid"]["operations"]["audio"]  # nothing builds on a missing upload
    assert ids(other) == {}
    assert ids({"source": {"sha256": sha, "size": 10}}) == {} and ids(None) == {}
