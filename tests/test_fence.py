"""Paid once, proven by the fence: every ending names the take that sent it, nodes are their IDs, leases are the
database's clock, deliveries come only from the live revision, and a start-up sweep removes only its own leftovers.

Each test pins one way the same operation was paid for twice, or one node undid another's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import API_KEY, NA_KEY, NA_POLICY, Service, body, make_settings, wait_for, write_tone
from tests.test_archive import archive_settings
from watcher.config import ArchiveConfig, SidecarConfig
from watcher.emulator import Emulator
from watcher.errors import ConfigError
from watcher.pipelines.archive import ArchivePipeline
from watcher.pipelines.deliver import Deliverer
from watcher.pipelines.paid import PaidCalls, Taken
from watcher.services.neuralanalog import NeuralAnalogClient
from watcher.store import LeaseLost, Operation, Store, utc_day
from watcher.store.aio import AsyncStore
from watcher.store.postgres import PostgresStore

pytestmark = pytest.mark.timeout(120)
SHA = "ef" * 32
UPLOAD = Operation(SHA, "processing http://x account:1", "upload", "p1", "reask")
MASTER = Operation(SHA, "processing http://x account:1", "master", "p2", "hold")
LATER = 3600.0  # a take this far ahead (database clock) finds every 600 s lease run out


def ledger(store: Any) -> list[tuple[int, str]]:
    """Every ledger line of the store, (id, ending), in order."""
    sql = "SELECT id, outcome FROM ledger ORDER BY id"
    if isinstance(store, Store):
        return [(r[0], r[1]) for r in store._db.execute(sql)]
    return [(r["id"], r["outcome"]) for r in store._all(sql)]


def take(store: Any, op: Operation, holder: str, **kw: Any) -> Any:
    return store.gate_take([op], holder, budget="processing", seconds=10.0, **kw)[0]


# -- finding 3: a holder whose lease ran out reports late ----------------------------------------------------


class Paid:
    """PaidCalls over ``store``, called from a test: each ending through the store's asynchronous port."""

    def __init__(self, store: Any, budget: str) -> None:
        self.store, self.budget = store, budget

    def finish(self, taken: Taken, results: dict[Operation, str | None], ending: str, why: str) -> None:
        async def go() -> None:
            aio = AsyncStore(self.store)
            try:
                await PaidCalls(aio, self.budget).finish(taken, results, ending, why)
            finally:
                await aio.aclose(close_store=False)

        asyncio.run(go())


def test_a_late_holder_cannot_reopen_an_operation_another_holder_is_sending(store):
    """A stalls past its lease, B takes the operation over; A's late "answer lost" reopens nothing, so a third
    taker waits; A's late ID is kept and, when B's answer is lost, answers the operation: 2 sends, never 3."""
    a = take(store, UPLOAD, "a:1:1@" + "a" * 16)
    b = take(store, UPLOAD, "b:1:1@" + "b" * 16, now=time.time() + LATER)
    assert (b.verdict, b.resend) == ("send", True)
    assert b.fence.generation == a.fence.generation + 1
    assert store.gate_release(UPLOAD, "reask", fence=a.fence, error="read timeout") is False
    assert take(store, UPLOAD, "c:1:1@" + "c" * 16).verdict == "wait", "a late release reopened it"
    assert store.gate_answered(UPLOAD, "audio-from-a", fence=a.fence) is False
    row = store.gate_get(UPLOAD)
    assert (row["state"], row["holder"], row["result"]) == ("sending", b.fence.holder, None)
    assert store.gate_release(UPLOAD, "reask", fence=b.fence, error="read timeout") is True
    third = take(store, UPLOAD, "c:1:1@" + "c" * 16)
    assert (third.verdict, third.result) == ("answered", "audio-from-a")
    assert store.gate_get(UPLOAD)["sends"] == 2


def test_a_late_ending_is_recorded_late_and_a_late_answer_nobody_holds_is_kept(store):
    """The late request's ledger line says `late`; its ID answers an operation left in doubt (nobody holds it),
    so it is never sent again; a late "answer lost" after B answered changes nothing."""
    paid = Paid(store, "processing")
    a = take(store, MASTER, "a:1:1@" + "a" * 16)
    assert store.gate_recover("a:1:1@" + "a" * 16) == 1  # its node restarted: the operation is held in doubt
    late = Taken([a], 10.0, send=[MASTER], request=a.request, fences={MASTER: a.fence})
    paid.finish(late, {MASTER: "m-from-a"}, "answered", "")
    assert dict(ledger(store))[a.request] == "late"
    held = take(store, MASTER, "b:1:1@" + "b" * 16)
    assert (held.verdict, held.result) == ("answered", "m-from-a")
    b = take(store, UPLOAD, "b:1:1@" + "b" * 16, now=time.time() + LATER)
    assert store.gate_answered(UPLOAD, "audio-b", fence=b.fence)
    assert store.gate_release(UPLOAD, "open", fence=a.fence) is False
    assert (store.gate_get(UPLOAD)["state"], store.gate_get(UPLOAD)["result"]) == ("answered", "audio-b")


def test_a_re_ask_that_was_not_sent_stays_a_re_ask(store):
    """A stream cut after one model, its re-ask refused before any work (a 429), then sent: the take that finally
    goes is reported as a re-ask, since the first stream may have been billed for those models too. Found by the
    bill check of the chaos test: the not-sent re-ask reopened the models as new, and their next take said `first`."""
    paid = Paid(store, "analysis")
    holder = "a:1:1@" + "a" * 16
    key, bpm = (Operation(SHA, "analysis http://y account:2", f"analyze:{m}", "", "reask") for m in ("key", "bpm"))
    first = store.gate_take([key, bpm], holder, budget="analysis", seconds=5)
    cut = Taken(first, 5.0, send=[key, bpm], request=first[0].request, fences={k.op: k.fence for k in first})
    paid.finish(cut, {key: None}, "answered", "the stream ended before finished")  # bpm is to be re-asked
    (again,) = store.gate_take([bpm], holder, budget="analysis", seconds=5)
    assert (again.verdict, again.resend) == ("send", True)
    not_sent = Taken([again], 5.0, send=[bpm], resends=[bpm], request=again.request, fences={bpm: again.fence})
    paid.finish(not_sent, {}, "not_sent", "HTTP 429")
    (last,) = store.gate_take([bpm], holder, budget="analysis", seconds=5)
    assert (last.verdict, last.resend) == ("send", True)
    today = utc_day(time.time())
    kinds = [(line["kind"], line["outcome"]) for line in store.ledger_lines(today, today)]
    assert kinds == [("first", "partial"), ("reask", "not_sent"), ("reask", "sending")]


def test_a_late_id_answers_the_operation_when_its_new_holder_dies(store):
    """A's late ID is kept beside B's send; B's node dies and restarts: the operation is answered by A's ID
    instead of being held in doubt (paid work is never thrown away)."""
    a = take(store, MASTER, "a:1:1@" + "a" * 16)
    b = take(store, MASTER, "b:1:1@" + "b" * 16, now=time.time() + LATER, resend_in_doubt=True)
    assert b.verdict == "send"
    assert store.gate_answered(MASTER, "m-from-a", fence=a.fence) is False
    assert store.gate_recover("b:1:1@" + "b" * 16) == 1
    row = store.gate_get(MASTER)
    assert (row["state"], row["result"], row["sends"]) == ("answered", "m-from-a", 2)


def test_late_analysis_results_are_kept_without_overwriting_the_new_holders(store):
    """A stream whose lease ran out keeps its results by content only where none are stored, and leaves the
    operation to the holder that took it over."""
    from watcher.store import StoredResult

    key = Operation(SHA, "analysis http://y account:2", "analyze:key", "", "reask")
    a = store.gate_take([key], "a", budget="analysis", seconds=5)[0]
    b = store.gate_take([key], "b", budget="analysis", seconds=5, now=time.time() + LATER)[0]
    assert store.save_result(SHA, "remote", StoredResult("key", "key", "1", "b", {"key": "C"}), key, b.fence)
    assert not store.save_result(SHA, "remote", StoredResult("key", "key", "1", "a", {"key": "D"}), key, a.fence)
    assert store.results_for(SHA, "remote")["key"].results == {"key": "C"}
    assert store.gate_get(key)["state"] == "answered"


# -- finding 8: a take whose commit acknowledgement was lost --------------------------------------------------


class _Recording:
    """A connection that notes whether its transaction wrote a ledger line (a take that charged)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn, self.charged = conn, False

    def execute(self, sql: Any, *args: Any, **kwargs: Any) -> Any:
        self.charged |= "INSERT INTO ledger" in str(sql)
        return self.conn.execute(sql, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


class _LostAcks(PostgresStore):
    """A store whose next ``lose`` takes commit on the server while the client is told the connection broke."""

    lose = 0

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        with super()._tx() as conn:
            recording = _Recording(conn)
            yield recording
        if self.lose and recording.charged:
            self.lose -= 1
            raise psycopg.OperationalError("server closed the connection unexpectedly")


def test_a_take_replayed_after_its_lost_commit_acknowledgement_recognises_itself(pg_url):
    """The take committed but its answer was lost: the replay gets its own ticket back (same request, same fence),
    charges nothing twice, and the answer closes the one ledger line (none stuck at `sending`)."""
    store = _LostAcks(pg_url)
    try:
        store.lose = 1
        ticket = take(store, MASTER, "a:1:1@" + "a" * 16)
        assert ticket.verdict == "send", "the job would wait on its own operation"
        assert [line for line, _ in ledger(store)] == [ticket.request]
        assert store.spend_on(utc_day(time.time()))["processing"]["calls"] == 1
        assert store.gate_answered(MASTER, "m-1", fence=ticket.fence)
        store.ledger_ending(ticket.request, "answered")
        assert ledger(store) == [(ticket.request, "answered")]
        assert store.gate_get(MASTER)["sends"] == 1
    finally:
        store.close()


# -- finding 4: one identity per node ---------------------------------------------------------------------


def test_a_second_node_under_a_live_nodes_name_is_refused_and_releases_nothing(pg_url):
    """Two machines answer to one name (a cloned VM): the second start is refused naming the name and the first
    one's last heartbeat; the first one's own restart takes back what its earlier life held, at once; no start
    releases a lease of a node whose name merely begins with its own."""
    first, second = PostgresStore(pg_url), PostgresStore(pg_url)
    one, two, three = "1" * 16, "2" * 16, "3" * 16
    try:
        for name in ("a.wav", "b.wav"):
            first.register_revision(
                folder="/share", path=f"/share/{name}", rel_path=name, size=1, mtime_ns=1, inode=1,
                jobs=[("analyze", "analyze")],
            )  # fmt: skip
        first.claim_node_name("studio", one)
        held = first.claim("analyze", f"studio:10:1@{one}")
        assert held is not None
        assert take(first, MASTER, f"studio:10:1@{one}").verdict == "send"
        first.claim_node_name("studio:2", three)
        other = first.claim("analyze", f"studio:2:30:1@{three}")  # a node whose name begins with "studio:"
        assert other is not None
        with pytest.raises(ConfigError) as refused:
            second.claim_node_name("studio", two)
        assert "'studio'" in str(refused.value) and "last heartbeat" in str(refused.value)
        assert second.release_node(two, f"studio:20:2@{two}") == (0, 0)
        assert first.release_node(one, f"studio:11:2@{one}") == (1, 1)  # its own earlier life: back at once
        jobs = {r["id"]: r["lease_owner"] for r in first._all("SELECT id, lease_owner FROM jobs")}
        assert jobs == {held.id: None, other.id: f"studio:2:30:1@{three}"}
    finally:
        first.close()
        second.close()


def _node(tmp_path: Path, name: str, node: str, inbox: Path, emu: Emulator, url: str) -> subprocess.Popen[str]:
    state = tmp_path / node
    state.mkdir()
    config = tmp_path / f"{node}.toml"
    config.write_text(
        f'state_dir = "{state}"\n[[folders]]\npath = "{inbox}"\nsettle_seconds = 0.3\nrescan_interval = 3600\n'
        f'[analysis]\nbackend = "remote"\nbase_url = "{emu.url}"\napi_key = "{API_KEY}"\n'
        f'[store]\nurl = "{url}"\nnode_name = "{name}"\nlease_seconds = 5\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    return subprocess.Popen(
        [sys.executable, "-m", "watcher", "--config", str(config), "--log-format", "json", "run"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _beating(url: str, name: str) -> bool:
    """True once a node named ``name`` has sent a heartbeat to the store at ``url``."""
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_tables WHERE tablename='nodes'").fetchone() is None:
            return False
        return conn.execute("SELECT 1 FROM nodes WHERE name=%s AND owner <> ''", (name,)).fetchone() is not None


def test_a_cloned_machine_with_the_same_node_name_exits_2_naming_the_name(tmp_path, pg_url):
    """A real second daemon under a live daemon's node name exits with 2 (a configuration error: systemd's unit
    does not restart it) and says which name and when its holder last beat; the first one keeps running."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with Emulator(analysis_key=API_KEY, use_local=False) as emu:
        first = _node(tmp_path, "studio", "one", inbox, emu, pg_url)
        try:
            wait_for(lambda: _beating(pg_url, "studio"), timeout=30, what="the first node's heartbeat")
            second = _node(tmp_path, "studio", "two", inbox, emu, pg_url)
            out, err = second.communicate(timeout=60)
            assert second.returncode == 2, (out, err)
            assert "node_name 'studio'" in err and "last heartbeat" in err
            assert first.poll() is None, "the first node stopped"
        finally:
            first.send_signal(signal.SIGTERM)
            first.communicate(timeout=40)


# -- finding 9: a superseded job's late download --------------------------------------------------------------


@pytest.mark.usefixtures("gate_stand_in")
@pytest.mark.bill_exempt("the revisions are uploaded and mastered by the client alone, to set the scene: no ledger")
def test_a_superseded_jobs_late_download_never_replaces_the_newer_delivery(tmp_path, na: Service):
    """Revision 1's archive job is still downloading when revision 2 arrives and is delivered: revision 1's fetch
    ends in LeaseLost with the delivery folder as revision 2 left it (no `.replaced-` folder, no rename)."""
    na.emu.faults.polls_needed = 0
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    store = Store(tmp_path / "state" / "watcher.db")
    cfg = ArchiveConfig(enabled=True, base_url=na.api.url, api_key=NA_KEY, output_dir=out, versions=("mastered",))

    def revision(seconds: float) -> Any:
        source = write_tone(inbox / "take.wav", seconds)
        st = source.stat()
        store.register_revision(
            folder=str(inbox), path=str(source), rel_path="take.wav", size=st.st_size, mtime_ns=st.st_mtime_ns,
            inode=st.st_ino, jobs=[("archive", "fetch")],
        )  # fmt: skip
        job = store.claim("archive", f"w{seconds}")
        assert job is not None
        return job

    async def processed(client: NeuralAnalogClient, job: Any) -> None:
        """The job as the archive pipeline leaves it before its fetch: uploaded and mastered."""
        audio = await client.upload(body(Path(job.file.path)))
        ids = {"audio": audio, "mastered": await client.master(audio, {})}
        store.commit(job, sha256=f"{job.file.size:064x}", ids=ids, versions={"mastered": "ready"})

    async def go() -> None:
        async with NeuralAnalogClient(na.api.url, NA_KEY, NA_POLICY) as client:
            pipeline = ArchivePipeline(
                AsyncStore(store),
                client,
                cfg,
                Deliverer(client, cfg, lambda _job: out),
                SidecarConfig(),
                where="processing",
            )
            old = revision(0.5)
            await processed(client, old)
            new = revision(0.7)  # the newer revision arrives while the old job downloads: the old one is superseded
            await processed(client, new)
            assert (await pipeline._fetch(new)).state == "done"
            manifest = json.loads((out / "take" / "manifest.json").read_text())
            with pytest.raises(LeaseLost):
                await pipeline._fetch(old)
            assert json.loads((out / "take" / "manifest.json").read_text()) == manifest
            assert sorted(p.name for p in out.iterdir()) == ["take"], "the newer delivery was moved aside"

    try:
        asyncio.run(go())
    finally:
        store.close()


# -- finding 10: the start-up sweep on a shared output folder --------------------------------------------------


@pytest.fixture
def emu() -> Iterator[Emulator]:
    from tests.test_archive import PKEY

    with Emulator(analysis_key=API_KEY, processing_key=PKEY, use_local=False) as e:
        yield e


def test_a_starting_daemon_sweeps_its_own_leftovers_not_another_nodes_staging(tmp_path, emu, run_daemon):
    """An output folder two nodes share: the start-up sweep removes this node's leftover from its last life and
    leaves the other node's staging folder (it may be downloading into it right now)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    settings = archive_settings(tmp_path, inbox, emu)
    me, other = "a1" * 8, "b2" * 8
    settings.state_dir.mkdir(parents=True)
    (settings.state_dir / "node-id").write_text(me + "\n")
    out = tmp_path / "out"
    mine = out / "album" / f".watcher-tmp-n{me}-4-song"
    theirs = out / "album" / f".watcher-tmp-n{other}-9-song"
    for folder in (mine, theirs):
        folder.mkdir(parents=True)
        (folder / "mastered.wav").write_bytes(b"RIFF")
    run_daemon(settings)
    wait_for(lambda: not mine.exists(), timeout=30, what="the start-up sweep")
    assert (theirs / "mastered.wav").read_bytes() == b"RIFF"


@pytest.mark.parametrize("poll", [False, True], ids=["native", "polled"])
def test_the_start_up_scan_sweeps_the_watched_folders_leftovers(tmp_path, emu, run_daemon, poll):
    """A watched folder's leftovers are removed by the start-up scan's own walk (no second listing of the tree):
    a half-written sidecar of this node's last life (as named now and as 0.2 named it), one in a folder the
    filter excludes; another node's recent one, anything behind a link and the audio stay, and the audio is
    analysed as usual."""
    inbox, elsewhere = tmp_path / "inbox", tmp_path / "elsewhere"
    settings = make_settings(tmp_path, inbox, emu.url)
    folder = settings.folders[0].model_copy(update={"poll": poll, "poll_interval": 0.5})
    settings = settings.model_copy(update={"folders": (folder,)})
    me, other = "a1" * 8, "b2" * 8
    settings.state_dir.mkdir(parents=True)
    (settings.state_dir / "node-id").write_text(me + "\n")
    song = write_tone(inbox / "album" / "song.wav")
    gone = [
        inbox / "album" / f".watcher-tmp-n{me}ldeadbeef-song.wav.analysis.json",
        inbox / f".watcher-tmp-n{me}-x.json",
        inbox / "@eaDir" / f".watcher-tmp-n{me}ldeadbeef-y.json",
    ]
    kept = [inbox / "album" / f".watcher-tmp-n{other}l0badcafe-z.json", elsewhere / f".watcher-tmp-n{me}-w.json"]
    for path in gone + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{")
    (inbox / "away").symlink_to(elsewhere)
    run_daemon(settings)
    sidecar = song.with_name(song.name + ".analysis.json")
    wait_for(sidecar.exists, timeout=30, what="the sidecar of the file already there")
    assert [p.name for p in gone if p.exists()] == []
    assert all(p.read_text() == "{" for p in kept)
    assert json.loads(sidecar.read_text())
