"""Several daemons, one share, one PostgreSQL store: each file processed once, a killed node's work taken over,
each paid operation counted at the emulator exactly as often as the gate let it be sent; clock skew and lost
connections do not lead to double work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import API_KEY, wait_for, write_tone
from watcher.emulator import Emulator
from watcher.store import Operation
from watcher.store.postgres import PostgresStore

pytestmark = pytest.mark.timeout(180)
LEASE = 3.0


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator(analysis_key=API_KEY, use_local=False) as e:
        yield e


def node_config(tmp_path: Path, name: str, inbox: Path, emu: Emulator, url: str, **analysis: object) -> Path:
    """One node's config file: its own state folder, the shared folder and the shared store."""
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in analysis.items())
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'state_dir = "{tmp_path / name}"\n'
        f'[[folders]]\npath = "{inbox}"\nsettle_seconds = 0.3\nrescan_interval = 3600\n'
        f'[analysis]\nbackend = "remote"\nbase_url = "{emu.url}"\napi_key = "{API_KEY}"\n{extra}'
        f"[retry]\nbackoff_initial = 0.2\nbackoff_max = 1.0\nmax_attempts = 6\n"
        f'[store]\nurl = "{url}"\nnode_name = "{name}"\nlease_seconds = {LEASE}\n'
    )
    return path


class Node:
    """A real `watcher run` process."""

    def __init__(self, tmp_path: Path, name: str, config: Path) -> None:
        self.name = name
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
        self.log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", "--config", str(config), "--log-format", "json", "run"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=40)
        self.log.close()
        return code


def sql(url: str, query: str, *args: object) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, args).fetchall()  # type: ignore[arg-type]


def done_count(url: str) -> int:
    rows = sql(url, "SELECT COUNT(*) FROM jobs WHERE state='done'") if _has_schema(url) else [(0,)]
    return int(rows[0][0])


def _has_schema(url: str) -> bool:
    return bool(sql(url, "SELECT 1 FROM pg_tables WHERE tablename='jobs'"))


def make_files(inbox: Path, n: int) -> list[Path]:
    """``n`` distinct short tones (distinct content: one paid stream each), written elsewhere and moved in."""
    staging = inbox.parent / "staging"
    out = []
    for i in range(n):
        src = write_tone(staging / f"f{i:03d}.wav", 0.2, freq=200 + 7 * i)
        dest = inbox / src.name
        os.rename(src, dest)
        out.append(dest)
    return out


def paid_and_sent(emu: Emulator, url: str) -> tuple[dict[str, int], dict[str, int]]:
    """Per operation: how often the service billed it, and how often the gate let it be sent (every billed one
    was let through the gate: a node never sends without taking it). One let through may never have been billed:
    its node was killed after taking it and before the request left (waiting for the client's rate limit)."""
    sends = {f"{sha}/{op}": int(n) for sha, op, n in sql(url, "SELECT sha256, operation, sends FROM operations")}
    paid = {f"{sha}/{op}": n for (sha, op), n in emu.paid().items()}
    assert set(paid) <= set(sends)
    assert all(paid[k] <= sends[k] for k in paid), "a paid request the gate did not let through"
    return paid, sends


@pytest.mark.parametrize("nodes", [2, 3])
def test_nodes_share_the_work_and_a_killed_one_is_taken_over(tmp_path, inbox, emu, pg_url, nodes):
    """60 files, real daemons on one folder and one store; one SIGKILLed mid-run: every file done once, and no
    paid operation sent more often than the gate counted (only streams the dead node had in flight are re-asked)."""
    emu.analysis.faults.event_delay = 0.05  # a stream takes a moment, so the kill finds work in flight
    names = [f"n{i}" for i in range(1, nodes + 1)]
    # Two streams per node, so that 60 files spread over every node (at the default 40 concurrent requests, the first
    # nodes to start would take them all).
    running = {n: Node(tmp_path, n, node_config(tmp_path, n, inbox, emu, pg_url, concurrency=2)) for n in names}
    try:
        wait_for(lambda: _has_schema(pg_url), timeout=30, what="the schema")
        files = make_files(inbox, 60)
        victim = names[0]
        wait_for(
            lambda: (
                sql(pg_url, "SELECT 1 FROM jobs WHERE state='done'")
                and sql(
                    pg_url, "SELECT 1 FROM jobs WHERE lease_owner LIKE %s AND lease_until IS NOT NULL", victim + ":%"
                )
            ),
            timeout=60,
            what=f"{victim} holding a job after some files are done",
        )
        held = sql(pg_url, "SELECT COUNT(*) FROM jobs WHERE lease_owner LIKE %s", victim + ":%")[0][0]
        killed_at = time.monotonic()
        running[victim].stop(signal.SIGKILL)
        wait_for(lambda: done_count(pg_url) == 60, timeout=90, what="all 60 files done")
        takeover = time.monotonic() - killed_at
        for f in files:
            assert json.loads(Path(f"{f}.analysis.json").read_text())["source"]["name"] == f.name
        states = sql(pg_url, "SELECT state, COUNT(*) FROM jobs GROUP BY state")
        assert states == [("done", 60)]
        paid, sends = paid_and_sent(emu, pg_url)
        assert len(paid) == 60 * 3  # three models per file, each one operation, each billed at least once
        twice = {k: n for k, n in paid.items() if n > 1}
        # Only a stream the dead node had in flight may be billed again (analysis answers are lost with it):
        assert len(twice) <= 3 * held, f"billed more than once: {twice}"
        resent = sum(n - 1 for n in sends.values())
        by_node = dict(sql(pg_url, "SELECT name, 1 FROM nodes"))
        assert set(by_node) == set(names)
        print(
            f"nodes={nodes} killed {victim} holding {held} job(s); all done {takeover:.1f} s later; operations "
            f"{len(paid)}, billed {sum(paid.values())}, billed twice {len(twice)}, re-asked {resent}"
        )
    finally:
        for n in running.values():
            n.stop()


def test_processing_calls_are_never_repeated_when_a_node_is_killed(tmp_path, inbox, pg_url):
    """Archive on two nodes, one SIGKILLed while it holds jobs: the survivor resumes the dead node's files from
    their checkpoints with the stored IDs; no processing call (upload, master) is billed twice: a call cut off in
    flight is held in doubt for the user instead."""
    from tests.test_archive import PKEY

    with Emulator(analysis_key=API_KEY, processing_key=PKEY, use_local=False) as emu:
        emu.processing.faults.polls_needed = 4
        archive = {
            "enabled": True, "base_url": emu.url, "api_key": PKEY, "output_dir": str(tmp_path / "out"),
            "poll_initial": 0.05, "poll_max": 0.2, "versions": ["original", "mastered"],
        }  # fmt: skip
        names = ("k1", "k2")
        running = {}
        for n in names:
            config = node_config(tmp_path, n, inbox, emu, pg_url)
            config.write_text(
                config.read_text().replace('backend = "remote"', 'enabled = false\nbackend = "remote"')
                + "[archive]\n"
                + "".join(f"{k} = {json.dumps(v)}\n" for k, v in archive.items())
            )
            running[n] = Node(tmp_path, n, config)
        try:
            wait_for(lambda: _has_schema(pg_url), timeout=30, what="the schema")
            make_files(inbox, 16)
            wait_for(
                lambda: (
                    sql(pg_url, "SELECT 1 FROM jobs WHERE state='done'")
                    and sql(pg_url, "SELECT 1 FROM jobs WHERE lease_owner LIKE %s AND lease_until IS NOT NULL", "k1:%")
                ),
                timeout=60,
                what="k1 holding a job after some files are done",
            )
            held = sql(pg_url, "SELECT COUNT(*) FROM jobs WHERE lease_owner LIKE %s", "k1:%")[0][0]
            running["k1"].stop(signal.SIGKILL)
            settled = "SELECT COUNT(*) FROM jobs WHERE state IN ('done', 'in_doubt')"
            wait_for(lambda: sql(pg_url, settled)[0][0] == 16, timeout=120, what="every file done or held")
            paid, sends = paid_and_sent(emu, pg_url)
            assert paid and max(paid.values()) == 1, {k: n for k, n in paid.items() if n > 1}
            assert max(sends.values()) == 1  # the gate never let a processing call out twice
            # A call let through but never billed (cut off before it left) is held in doubt, never forgotten.
            held_ops = sql(pg_url, "SELECT sha256 || '/' || operation FROM operations WHERE state='in_doubt'")
            assert set(sends) - set(paid) <= {k for (k,) in held_ops}
            doubt = sql(pg_url, "SELECT COUNT(*) FROM jobs WHERE state='in_doubt'")[0][0]
            assert doubt <= held
            print(f"archive: killed k1 holding {held}; {16 - doubt} done, {doubt} held in doubt; "
                  f"{len(paid)} processing calls, each billed once")  # fmt: skip
        finally:
            for n in running.values():
                n.stop()


def test_a_node_cut_off_from_the_database_again_and_again_does_no_double_work(tmp_path, inbox, emu, pg_url, pg_cluster):
    """Two daemons; one node's connections are killed by the server (pg_terminate_backend) every half second while
    it works: it reconnects, every file is done once, and every paid operation is billed exactly once."""
    emu.analysis.faults.event_delay = 0.05
    running = [Node(tmp_path, n, node_config(tmp_path, n, inbox, emu, pg_url)) for n in ("p1", "p2")]
    try:
        wait_for(lambda: _has_schema(pg_url), timeout=30, what="the schema")
        wait_for(lambda: len(sql(pg_url, "SELECT name FROM nodes")) == 2, timeout=30, what="both heartbeats")
        make_files(inbox, 40)
        cuts = 0
        deadline = time.monotonic() + 90
        while done_count(pg_url) < 40 and time.monotonic() < deadline:
            cuts += pg_cluster.terminate(pg_url, application_name="watcher p1")
            time.sleep(0.5)  # sleep-ok: the interval between two partitions, not a synchronisation
        assert done_count(pg_url) == 40 and cuts > 0
        assert all(n.proc.poll() is None for n in running), "a node died of a lost connection"
        paid, _ = paid_and_sent(emu, pg_url)
        assert len(paid) == 40 * 3 and set(paid.values()) == {1}
        assert sql(pg_url, "SELECT state, COUNT(*) FROM jobs GROUP BY state") == [("done", 40)]
        print(f"connections cut {cuts} times; 40 files done; {len(paid)} operations billed once each")
    finally:
        for n in running:
            n.stop()


def test_status_on_any_node_shows_every_node_and_the_holder(tmp_path, inbox, emu, pg_url):
    """`watcher status --json` on one machine lists every node with its heartbeat, and who holds a job."""
    emu.analysis.faults.event_delay = 0.5
    configs = {n: node_config(tmp_path, n, inbox, emu, pg_url) for n in ("a", "b")}
    running = [Node(tmp_path, n, c) for n, c in configs.items()]
    try:
        wait_for(lambda: _has_schema(pg_url), timeout=30, what="the schema")
        wait_for(lambda: len(sql(pg_url, "SELECT name FROM nodes")) == 2, timeout=30, what="both heartbeats")
        make_files(inbox, 2)
        wait_for(lambda: sql(pg_url, "SELECT 1 FROM jobs WHERE lease_until IS NOT NULL"), what="a job held")
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
        out = subprocess.run(
            [sys.executable, "-m", "watcher", "--config", str(configs["a"]), "status", "--json"],
            env=env, capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        report = json.loads(out.stdout)
        assert {n["name"] for n in report["nodes"]} == {"a", "b"}
        assert all(n["version"] and n["last_heartbeat"] for n in report["nodes"])
        assert report["schema_version"] >= 2
        assert all(n["holder"] == n["owner"] and n["holder"].startswith(n["name"]) for n in report["nodes"])
        held = [j for f in report["files"] for j in f["jobs"].values() if j.get("node")]
        assert held and {j["node"] for j in held} <= {"a", "b"}
        assert "password" not in out.stdout
    finally:
        for n in running:
            n.stop()


# -- the adapter under a skewed clock and a partition --------------------------------------------------------


def _register(store: PostgresStore, name: str = "a.wav") -> int:
    return store.register_revision(
        folder="/share", path=f"/share/{name}", rel_path=name, size=1, mtime_ns=1, inode=1, jobs=[("analyze", "a")]
    )[0]


def test_a_node_clock_stepped_ten_minutes_forward_or_back_takes_no_lease_early(pg_url):
    """Leases, due times and gate entries live in the database's clock only: a node whose clock is stepped 10
    minutes forward after its start neither claims a live job nor takes a live operation; one stepped 10 minutes
    back leases for as long as it asked (no one takes its job early), and still takes over an expired lease."""
    step = [0.0]
    honest = PostgresStore(pg_url, lease=30)
    stepped = PostgresStore(pg_url, clock=lambda: time.time() + step[0], lease=30)
    try:
        _register(honest)
        _register(honest, "b.wav")
        assert stepped.next_due("analyze") == pytest.approx(time.time(), abs=5)  # at start the clocks agree
        job = honest.claim("analyze", "honest:1:1@0000000000000001", lease=30)
        assert job is not None
        op = Operation("ab" * 32, "analysis http://x account:1", "analyze:key", "", "reask")
        assert honest.gate_take([op], job.holder or "", budget="analysis", seconds=1)[0].verdict == "send"
        step[0] = 600.0  # an NTP step, a resumed VM: ten minutes forward
        mine = stepped.claim("analyze", "stepped:1:1@0000000000000002", lease=30)
        assert mine is not None and mine.id != job.id, "the live job was taken"
        assert stepped.claim("analyze", "stepped:1:1@0000000000000002", lease=30) is None
        assert stepped.gate_take([op], "stepped:1:1@0000000000000002", budget="analysis", seconds=1)[0].verdict == (
            "wait"
        )
        stepped.release(mine, next_attempt_at=stepped._clock() + 300)  # a backoff: five minutes, not fifteen
        assert stepped.next_due("analyze") == pytest.approx(time.time() + 600 + 30, abs=5)  # honest's lease ends
        step[0] = -600.0  # and ten minutes back
        assert honest.claim("analyze", "honest:1:1@0000000000000001", lease=30) is None  # b.wav waits its backoff
        honest.renew([job.id], job.holder or "", lease=-1)  # the honest node dies: its lease runs out
        late = stepped.claim("analyze", "stepped:1:1@0000000000000002", lease=30)
        assert late is not None and late.id == job.id
        assert honest.claim("analyze", "honest:2:2@0000000000000001", lease=30) is None, "a lease taken early"
        assert stepped.next_due("analyze") == pytest.approx(time.time() - 600 + 30, abs=5)  # its own clock
    finally:
        for s in (honest, stepped):
            s.close()


def test_connections_killed_by_the_server_do_not_lead_to_double_work(pg_url, pg_cluster):
    """A partition between a node and the database (its connections terminated): the node reconnects, its lease
    and its gate entry still fence the work, and the other node neither claims the job nor sends the operation."""
    a = PostgresStore(pg_url, lease=30)
    b = PostgresStore(pg_url, lease=30)
    try:
        _register(a)
        job = a.claim("analyze", "a:1:1")
        assert job is not None
        op = Operation("cd" * 32, "analysis http://x account:1", "analyze:key", "", "reask")
        sent = a.gate_take([op], "a:1:1", budget="analysis", seconds=1)[0]
        assert sent.verdict == "send"
        assert pg_cluster.terminate(pg_url) >= 2  # every connection of both nodes, mid-work
        assert b.claim("analyze", "b:1:1") is None
        assert b.gate_take([op], "b:1:1", budget="analysis", seconds=1)[0].verdict == "wait"
        a.commit(job, step="streamed")  # a's pooled connection is gone: it reconnects and still holds the lease
        assert a.gate_answered(op, "done", fence=sent.fence)
        a.release(job, state="done")
        assert b.gate_take([op], "b:1:1", budget="analysis", seconds=1)[0].verdict == "answered"
        assert b.gate_get(op)["sends"] == 1
        assert b.counts() == {"analyze": {"done": 1}}
    finally:
        a.close()
        b.close()


def test_files_are_matched_across_mounts_by_folder_id_and_relative_path(pg_url):
    """Two machines mounting the share at different places see one revision (and one job), each with its own
    absolute path; the inode (which SMB `noserverino` makes differ per client) is not part of the identity."""
    one = PostgresStore(pg_url)
    two = PostgresStore(pg_url)
    try:
        one.use_folders({"/mnt/nas/inbox": "folder-1"})
        two.use_folders({"/Volumes/inbox": "folder-1"})
        args = {"rel_path": "sub/x.wav", "size": 5, "mtime_ns": 9, "jobs": [("analyze", "a")]}
        fid, new = one.register_revision(folder="/mnt/nas/inbox", path="/mnt/nas/inbox/sub/x.wav", inode=11, **args)
        assert new
        assert two.known_revision("/Volumes/inbox/sub/x.wav", 5, 9, 999)
        assert two.register_revision(folder="/Volumes/inbox", path="/Volumes/inbox/sub/x.wav", inode=999, **args) == (
            fid,
            False,
        )
        job = two.claim("analyze", "two:1:1")
        assert job is not None and job.file.path == "/Volumes/inbox/sub/x.wav"
        assert one.current_revision("/mnt/nas/inbox/sub/x.wav").path == "/mnt/nas/inbox/sub/x.wav"
        three = PostgresStore(pg_url)
        three.use_folders({"/elsewhere": "folder-2"})
        _register(one, "y.wav")  # a folder node three does not watch
        assert three.claim("a", "three:1:1") is None
        three.close()
    finally:
        one.close()
        two.close()


def test_prometheus_samples_carry_the_node():
    """With a shared store each node's metrics say which node they come from."""
    from watcher.metrics import Metrics

    metrics = Metrics(node="studio-a")
    metrics.file_done("analyze")
    text = metrics.exposition()
    assert 'watcher_files_done_total{node="studio-a",pipeline="analyze"} 1.0' in text
    assert 'node="studio-a"' not in Metrics().exposition()


def test_store_settings_from_the_environment_and_credentials(tmp_path, monkeypatch):
    """`WATCHER_STORE__URL` works; a password in the URL is refused (it would reach logs); the systemd credential
    `pgpass` becomes the passfile."""
    from watcher.config import load_settings
    from watcher.errors import ConfigError

    env = {"WATCHER_STORE__URL": "postgresql://watcher@db.example:5432/watcher"}
    monkeypatch.setenv("WATCHER_STORE__URL", env["WATCHER_STORE__URL"])
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "pgpass").write_text("db.example:5432:watcher:watcher:s3cret-pw\n")
    settings = load_settings(None, {**env, "CREDENTIALS_DIRECTORY": str(tmp_path / "creds")})
    assert settings.store.url == env["WATCHER_STORE__URL"]
    assert settings.store.passfile == tmp_path / "creds" / "pgpass"
    assert settings.store.node_name  # the host name by default
    monkeypatch.setenv("WATCHER_STORE__URL", "postgresql://watcher:s3cret-pw@db.example/watcher")
    with pytest.raises(ConfigError) as refused:
        load_settings(None, {})
    assert "passfile" in str(refused.value) and "s3cret-pw" not in str(refused.value)
