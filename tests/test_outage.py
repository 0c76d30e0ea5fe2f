"""A PostgreSQL outage survived: two real daemons, a cluster of this module's own, the server stopped at once
(``pg_ctl stop -m immediate``) for 10 s while analysis streams and uploads are in flight, then started again.

Nothing is asked twice (the bill check sees the one database both nodes keep their ledger in), every file is done,
no daemon exits, and the test prints the outage's timeline: stop, last answer journalled, replayed, first claim.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import API_KEY, make_settings, query, wait_for, write_tone
from tests.pg import Cluster, running
from tests.test_multinode import Node, _has_schema, make_files, node_config, sql
from watcher.emulator import Emulator

PKEY = "na-outage-key-7d1e"
OUTAGE_SECONDS = 10.0
FILES = 12


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[Cluster]:
    """A cluster of this module's own (never the session's shared one: it is stopped and started here), durable as a
    real server is (fsync and synchronous commit on): a crash must not lose what it acknowledged."""
    with running(durable=True) as cluster:
        yield cluster


@pytest.fixture
def pg_url(own_cluster: Cluster) -> str:
    """A new database in this module's own cluster (named ``pg_url`` so the bill check reads its ledger)."""
    return own_cluster.database()


def _events(log: Path, event: str) -> list[float]:
    """When each ``event`` line of a node's JSON log was written (Unix time)."""
    out = []
    for line in log.read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") == event:
            out.append(dt.datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00")).timestamp())
    return out


def _status(config: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    out = subprocess.run(
        [sys.executable, "-m", "watcher", "--config", str(config), "status", "--json"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


@pytest.mark.serial
@pytest.mark.timeout(300)
def test_a_database_outage_with_work_in_flight_is_survived(tmp_path, inbox, pg_url, own_cluster):
    """Two nodes analyse and archive 12 files; the server is stopped at once while streams and uploads are in flight,
    for 10 s: both daemons stay up, status says since when the store is unreachable, answers that came meanwhile are
    journalled and replayed before the next claim; every file is done, nothing is billed twice."""
    with Emulator(analysis_key=API_KEY, processing_key=PKEY, use_local=False) as emu:
        emu.analysis.faults.event_delay = 0.4  # a stream takes over a second: the stop finds some in flight
        emu.processing.faults.polls_needed = 2
        archive = {
            "enabled": True, "base_url": emu.url, "api_key": PKEY, "output_dir": str(tmp_path / "out"),
            "poll_initial": 0.2, "poll_max": 0.5, "versions": ["original"],
        }  # fmt: skip
        configs = {}
        for name in ("o1", "o2"):
            config = node_config(tmp_path, name, inbox, emu, pg_url, concurrency=3)
            text = config.read_text().replace("lease_seconds = 3.0", "lease_seconds = 30")
            # uploads at 96 KiB/s take about 2 s each: the stop finds some in flight too
            config.write_text('bwlimit = "96k"\n' + text + "[archive]\n" + "".join(
                f"{k} = {json.dumps(v)}\n" for k, v in archive.items()))  # fmt: skip
            configs[name] = config
        nodes = {name: Node(tmp_path, name, config) for name, config in configs.items()}
        halted_now = False
        try:
            wait_for(lambda: _has_schema(pg_url), timeout=30, what="the schema")
            make_files(inbox, FILES)
            sending = "SELECT DISTINCT service FROM ledger WHERE outcome='sending'"
            wait_for(
                lambda: {s for (s,) in sql(pg_url, sending)} >= {"analysis", "processing"},
                timeout=60,
                what="an analysis stream and an upload in flight at once",
            )
            stopped = time.time()
            own_cluster.halt()
            halted_now = True
            halted = time.time()

            def told() -> dict[str, str] | None:
                shown: dict[str, str] | None = _status(configs["o1"]).get("store_unreachable")  # type: ignore[assignment]
                return shown if shown and "claims paused" in shown.get("next", "") else None

            shown = wait_for(told, timeout=30, what="status saying what the daemon does while the store is away")
            told_at = time.time()
            outage_left = OUTAGE_SECONDS - (time.time() - stopped)
            if outage_left > 0:
                time.sleep(outage_left)  # sleep-ok: the outage's length is what is tested, not a synchronisation
            assert all(n.proc.poll() is None for n in nodes.values()), "a daemon exited during the outage"
            restarting = time.time()
            own_cluster.resume()
            halted_now = False
            resumed = time.time()
            done = "SELECT COUNT(*) FROM jobs WHERE state='done'"
            wait_for(lambda: sql(pg_url, done)[0][0] == 2 * FILES, timeout=180, what="every file analysed and archived")
            assert all(n.proc.poll() is None for n in nodes.values()), "a daemon exited after the outage"
            assert sql(pg_url, "SELECT state, COUNT(*) FROM jobs GROUP BY state") == [("done", 2 * FILES)]
            paid = emu.paid()
            twice = {sha: op for (sha, op), n in paid.items() if n > 1}
            for sha in twice:  # what the store says of each operation billed twice, to tell why
                ops = "SELECT operation, state, generation, sends, result FROM operations WHERE sha256=%s"
                print(sql(pg_url, ops, sha))
                print(sql(pg_url, "SELECT id, at, operation, kind, outcome FROM ledger WHERE sha256=%s", sha))
            assert paid and max(paid.values()) == 1, twice
            for f in inbox.glob("*.wav"):
                assert json.loads(Path(f"{f}.analysis.json").read_text())["source"]["name"] == f.name
        finally:
            if halted_now:  # a failure mid-outage: the cluster is stopped at the end as usual
                own_cluster.resume()
            codes = {name: n.stop() for name, n in nodes.items()}
        assert codes == {"o1": 0, "o2": 0}
    logs = {name: tmp_path / f"{name}.log" for name in nodes}
    journalled = [t for log in logs.values() for t in _events(log, "store.journalled")]
    replayed = [t for log in logs.values() for t in _events(log, "store.replayed")]
    resumed_claims = [t for log in logs.values() for t in _events(log, "store.claims_resumed") if t > stopped]
    unreachable = [t for log in logs.values() for t in _events(log, "store.unreachable")]
    assert unreachable and replayed and resumed_claims
    for name, log in logs.items():  # on each node that noticed, nothing was claimed before its journal was replayed
        claims = [t for t in _events(log, "store.claims_resumed") if t > stopped]
        if claims:
            assert min(t for t in _events(log, "store.replayed") if t > stopped) <= min(claims), name
    assert shown["unreachable_since"] and "answers journalled; retrying in" in shown["next"]

    def at(t: float) -> str:
        return f"{t - stopped:+.2f} s"

    print(
        f"\noutage timeline (from `pg_ctl stop -m immediate`, {halted - stopped:.2f} s to stop): `pg_ctl start` at "
        f"{at(restarting)}, accepting connections {at(resumed)}; first node saw it {at(min(unreachable))}; status "
        f"said so {at(told_at)}; answers journalled: {len(journalled)}"
        + (f", the last {at(max(journalled))}" if journalled else "")
        + f"; replayed {at(min(t for t in replayed if t > stopped))} (last node {at(max(replayed))}); "
        f"first claim after {at(min(resumed_claims))}; {len(paid)} operations billed once each"
    )


def test_a_locked_sqlite_store_is_waited_out_and_answers_meanwhile_are_journalled(
    tmp_path, inbox, emulator, run_daemon
):
    """Another process holds SQLite's write lock for 4 s while analysis streams are in flight: the daemon does not
    exit, the answers that arrived meanwhile went to the journal and were replayed (it ends empty), every file gets
    its sidecar, and nothing is billed twice."""
    emulator.analysis.faults.event_delay = 0.3  # three models: a stream takes about a second
    daemon = run_daemon(make_settings(tmp_path, inbox, emulator.url))
    for n in range(4):
        write_tone(inbox / f"t{n}.wav", 0.5, freq=300 + 40 * n)
    wait_for(lambda: query(tmp_path, "SELECT 1 FROM ledger WHERE outcome='sending'"), what="a stream in flight")
    locker = sqlite3.connect(tmp_path / "state" / "watcher.db", isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        time.sleep(4.0)  # sleep-ok: how long the file stays locked is what is tested, not a synchronisation
        assert daemon.exit_code is None and daemon.error is None  # still running
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    wait_for(lambda: all(Path(f"{f}.analysis.json").exists() for f in inbox.glob("*.wav")), timeout=60, what="sidecars")
    wait_for(lambda: query(tmp_path, "SELECT COUNT(*) FROM jobs WHERE state='done'") == (4,), what="every job done")
    journal = tmp_path / "state" / "outage-journal"
    assert journal.exists() and journal.stat().st_size == 0  # answers were journalled, then replayed
    assert max(emulator.paid().values()) == 1
    assert daemon.stop() == 0


def test_a_daemon_started_while_its_database_is_down_waits_for_it_instead_of_exiting(tmp_path, inbox, run_daemon):
    """[store] url names a server that refuses connections: the daemon keeps running, `watcher status` says since
    when the store is unreachable and that it retries, and a stop still ends it with 0."""
    from watcher import commands
    from watcher.store.away import read_outage

    settings = make_settings(tmp_path, inbox, "http://127.0.0.1:9")
    down = settings.store.model_copy(update={"url": "postgresql://watcher@127.0.0.1:1/watcher"})
    settings = settings.model_copy(update={"store": down})
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    from watcher.store.journal import JOURNAL_NAME, Journal

    earlier = Journal(settings.state_dir / JOURNAL_NAME)  # an earlier life's answers, waiting for the store too
    for n in range(2):
        earlier.append({"kind": "test", "n": n})
    earlier.close()
    daemon = run_daemon(settings)
    shown = wait_for(lambda: read_outage(settings.state_dir), timeout=30, what="the daemon saying its store is away")
    assert "127.0.0.1" in shown["error"] and "retrying in" in shown["next"]
    assert "2 answers journalled" in shown["next"] and shown["journalled"] == 2
    report = commands.status(settings)
    assert report["store_unreachable"]["unreachable_since"] == shown["unreachable_since"]
    assert daemon.exit_code is None and daemon.error is None
    assert daemon.stop() == 0


def test_a_lease_that_ran_out_while_the_server_was_down_is_not_taken_over_at_once(own_cluster, pg_url):
    """The database server restarts under a take (nobody could renew a lease meanwhile): for a lease from the
    restart the operation is not its dead holder's, so the node that holds its answer in a journal can come back
    and record it; only after that is it asked again by another node."""
    from watcher.store import Operation
    from watcher.store.postgres import PostgresStore

    op = Operation("ab" * 32, "analysis http://x account:1", "analyze:key", "", "reask")
    store = PostgresStore(pg_url, lease=30)
    try:
        first = store.gate_take([op], "runner:1@n1", budget="analysis", seconds=5, lease=-1)[0]  # ran out
        assert first.verdict == "send"
        own_cluster.halt()
        own_cluster.resume()
        other = wait_for(  # the first calls after the restart may find the pool's connections broken
            lambda: _take_or_none(store, op, "runner:1@n2"), timeout=30, what="a take after the restart"
        )
        assert other.verdict == "wait"  # the lease ran out during the restart: not taken over yet
        started = sql(pg_url, "SELECT extract(epoch FROM pg_postmaster_start_time())")[0][0]
        late = store.gate_take([op], "runner:1@n2", budget="analysis", seconds=5, now=float(started) + 31)[0]
        assert late.verdict == "send" and late.resend  # a lease after the restart: its holder is taken for dead
    finally:
        store.close()


def _take_or_none(store, op, holder):
    try:
        return store.gate_take([op], holder, budget="analysis", seconds=5)[0]
    except Exception:
        return None


@pytest.mark.serial
@pytest.mark.timeout(240)
@pytest.mark.parametrize("when", ["told", "at_once"])
def test_a_stop_during_an_outage_ends_within_ten_seconds_and_loses_no_answer(
    tmp_path, inbox, pg_url, own_cluster, when
):
    """The server is stopped at once with streams and uploads in flight; a SIGTERM (once the daemon says its store
    is away, or at once, with store calls still waiting on the server) ends it with 0 within the README's 10 s (it
    took 13.8 to 35 s: the stop and its checkpoint waited on the store), the answers that came are in its journal,
    and the next life, with the server back, replays them and pays nothing twice."""
    with Emulator(analysis_key=API_KEY, processing_key=PKEY, use_local=False) as emu:
        emu.analysis.faults.event_delay = 0.4
        archive = {
            "enabled": True, "base_url": emu.url, "api_key": PKEY, "output_dir": str(tmp_path / "out"),
            "poll_initial": 0.2, "poll_max": 0.5, "versions": ["original"],
        }  # fmt: skip
        config = node_config(tmp_path, "s1", inbox, emu, pg_url, concurrency=3)
        text = config.read_text().replace("lease_seconds = 3.0", "lease_seconds = 30")
        config.write_text('bwlimit = "96k"\n' + text + "[archive]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in archive.items()))  # fmt: skip
        node = Node(tmp_path, "s1", config)
        halted_now = False
        try:
            wait_for(lambda: _has_schema(pg_url), timeout=30, what="the schema")
            make_files(inbox, 6)
            sending = "SELECT DISTINCT service FROM ledger WHERE outcome='sending'"
            wait_for(lambda: {s for (s,) in sql(pg_url, sending)} >= {"analysis", "processing"}, timeout=60,
                     what="an analysis stream and an upload in flight at once")  # fmt: skip
            own_cluster.halt()
            halted_now = True
            if when == "told":
                wait_for(lambda: _status(config).get("store_unreachable"), timeout=30, what="the daemon saying so")
                env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
                paused = subprocess.run([sys.executable, "-m", "watcher", "--config", str(config), "pause", str(inbox)],
                                        env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
                assert paused.returncode == 3 and "internal error" not in paused.stderr, paused.stderr
                assert "the store cannot be reached now" in paused.stderr and "run the command again" in paused.stderr
            asked = time.monotonic()
            node.proc.send_signal(signal.SIGTERM)
            code = node.proc.wait(timeout=30)
            took = time.monotonic() - asked
            print(f"\nSIGTERM during the outage ({when}): exit {code} after {took:.2f} s")
            assert code == 0 and took <= 10.0, (code, took, (tmp_path / "s1.log").read_text()[-3000:])
            node.log.close()
            own_cluster.resume()
            halted_now = False
            node = Node(tmp_path, "s1", config)  # the next life replays the journal before it claims
            done = "SELECT COUNT(*) FROM jobs WHERE state='done'"
            wait_for(lambda: sql(pg_url, done)[0][0] == 12, timeout=120, what="every file analysed and archived")
            assert max(emu.paid().values()) == 1
        finally:
            if halted_now:
                own_cluster.resume()
            node.stop()


@pytest.mark.serial
@pytest.mark.timeout(240)
def test_a_scan_sent_to_the_daemon_during_an_outage_is_refused_at_once(tmp_path, inbox, pg_url, own_cluster):
    """Once the daemon says its store is away, `watcher scan FILE` sent to it answers within a few seconds (it
    waited 31 s for a connection from the pool first), with exit 3 and the plain message other commands give
    in an outage; once the server is back, the same scan processes the file."""
    from watcher.control import CommandFailed, ask
    from watcher.store.away import read_outage

    with Emulator(analysis_key=API_KEY, use_local=False) as emu:
        config = node_config(tmp_path, "c1", inbox, emu, pg_url)
        node = Node(tmp_path, "c1", config)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}

        def scan(path: Path) -> tuple[subprocess.CompletedProcess[str], float]:
            asked = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "watcher", "--config", str(config), "scan", str(path)],
                                  env=env, capture_output=True, text=True, timeout=90)  # fmt: skip
            return done, time.monotonic() - asked

        halted_now = False
        try:
            wait_for(lambda: _has_schema(pg_url), timeout=30, what="the schema")
            (first,) = make_files(inbox, 1)
            done = "SELECT COUNT(*) FROM jobs WHERE state='done'"
            wait_for(lambda: sql(pg_url, done)[0][0] == 1, timeout=60, what="the first file analysed")
            own_cluster.halt()
            halted_now = True
            # the daemon's own word (status alone would say so from its own failed read)
            wait_for(lambda: read_outage(tmp_path / "c1"), timeout=30, what="the daemon knowing its store is away")
            late = write_tone(inbox / "late.wav", 0.2, freq=880.0)
            asked = time.monotonic()
            with pytest.raises(CommandFailed) as answer:  # the daemon's own answer, without the CLI's start
                ask(tmp_path / "c1", {"command": "scan", "paths": [str(late)]})
            answered = time.monotonic() - asked
            assert answer.value.exit_code == 3 and answered <= 2.0, (answered, str(answer.value))
            refused, took = scan(late)
            print(f"\n`watcher scan` to the daemon during the outage: exit {refused.returncode} after {took:.2f} s "
                  f"(the daemon's own answer: {answered:.2f} s)")  # fmt: skip
            assert refused.returncode == 3 and "internal error" not in refused.stderr, refused.stderr
            assert "the store cannot be reached now" in refused.stderr and "run the command again" in refused.stderr
            assert took <= 5.0, took
            own_cluster.resume()
            halted_now = False
            wait_for(lambda: not _status(config).get("store_unreachable"), timeout=60, what="the store back")
            again, _ = scan(late)
            assert again.returncode == 0, again.stderr
            assert Path(f"{late}.analysis.json").exists() and Path(f"{first}.analysis.json").exists()
        finally:
            if halted_now:
                own_cluster.resume()
            code = node.stop()
        assert code == 0
    assert max(emu.paid().values()) == 1
