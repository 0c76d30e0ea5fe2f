"""A silent partition between a node and PostgreSQL: packets stop, nothing is closed, nothing is refused.

A TCP proxy on 127.0.0.1 stands between the daemon (or the adapter) and the test's database and, on command, stops
forwarding bytes while keeping every connection open (new ones are accepted and then left unanswered): what a
dropped route or a firewall that discards packets looks like from the node. The store's calls run in its own
threads, so the event loop stays on time and the systemd watchdog is pinged throughout; a call cut off for longer
than its deadline ends with StoreUnavailable instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import API_KEY, wait_for, write_tone
from watcher.emulator import Emulator
from watcher.store.ports import StoreUnavailable
from watcher.store.postgres import PostgresStore

PARTITION_SECONDS = 15.0
WATCHDOG_USEC = 2_000_000  # the daemon pings every second


class SilentProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; :meth:`cut` stops every byte (both ways, new connections too)
    without closing anything, :meth:`heal` lets them flow again (what was held is delivered then)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = [self.listener]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, url: str) -> str:
        """``url`` (a database of the test's cluster) through the proxy."""
        return re.sub(r"@127\.0\.0\.1:\d+/", f"@127.0.0.1:{self.port}/", url)

    def cut(self) -> None:
        self.flowing.clear()

    def heal(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self.closed.set()
        self.flowing.set()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError):
            while not self.closed.is_set():
                if not self.flowing.wait(0.1):
                    continue  # partitioned: nothing is read, so nothing moves and nothing is closed
                if not select.select([src], [], [], 0.1)[0]:
                    continue
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                while not self.flowing.wait(0.1):  # cut while this chunk was in hand: held until healed
                    if self.closed.is_set():
                        return
                dst.sendall(data)


@pytest.fixture
def proxy(pg_cluster) -> Iterator[SilentProxy]:
    p = SilentProxy(pg_cluster.port)
    yield p
    p.close()


class Watchdog:
    """The supervisor's end of $NOTIFY_SOCKET: every datagram the daemon sends, with when it came."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.got: list[tuple[float, str]] = []
        self.closed = False
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        while not self.closed:
            with contextlib.suppress(TimeoutError, OSError):
                data = self.sock.recv(4096)
                self.got.append((time.monotonic(), data.decode()))

    def pings(self, start: float, end: float) -> list[float]:
        return [t for t, m in self.got if "WATCHDOG=1" in m.splitlines() and start <= t <= end]

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lag(port: int) -> float | None:
    """watcher_loop_lag_seconds as the daemon's metrics endpoint says it now (None while it is not up)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    found = re.search(r"^watcher_loop_lag_seconds(?:\{[^}]*\})? (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def _when(event: dict[str, object]) -> float:
    """A log event's time (Unix seconds)."""
    return dt.datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def _done(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_tables WHERE tablename='jobs'").fetchone():
            return 0
        row = conn.execute("SELECT COUNT(*) FROM jobs WHERE state='done'").fetchone()
    return int(row[0]) if row else 0


def _tones(inbox: Path, first: int, n: int) -> None:
    staging = inbox.parent / "staging"
    for i in range(first, first + n):
        src = write_tone(staging / f"p{i}.wav", 0.3, freq=300 + 11 * i)
        os.rename(src, inbox / src.name)


@pytest.mark.serial
@pytest.mark.timeout(180)
def test_a_silent_partition_neither_stalls_the_loop_nor_starves_the_watchdog(tmp_path, inbox, pg_url, proxy):
    """A real daemon on PostgreSQL through the proxy, streams in flight; the proxy goes silent for 15 s. The loop
    lag stays below 1 s and the watchdog is pinged every second throughout, also while a file that settles then
    waits to be recorded; once healed, the held calls go through and every file (one added after the heal too) is
    done, the daemon still running."""
    metrics = _free_port()
    with Emulator(analysis_key=API_KEY, use_local=False) as emu:
        emu.analysis.faults.event_delay = 0.3  # each stream takes about a second: the cut finds some in flight
        config = tmp_path / "node.toml"
        config.write_text(
            f'state_dir = "{tmp_path / "state"}"\n'
            f'[[folders]]\npath = "{inbox}"\nsettle_seconds = 0.3\nrescan_interval = 3600\n'
            f'[analysis]\nbackend = "remote"\nbase_url = "{emu.url}"\napi_key = "{API_KEY}"\nconcurrency = 2\n'
            f'[store]\nurl = "{proxy.url(pg_url)}"\nnode_name = "cut"\n'
            f"[metrics]\nenabled = true\nport = {metrics}\n[web]\nenabled = false\n"
        )
        watchdog = Watchdog(tmp_path / "notify")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WATCHER_", "NOTIFY_", "WATCHDOG_"))}
        env |= {"NOTIFY_SOCKET": str(watchdog.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        log = tmp_path / "node.log"
        with open(log, "w") as out:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "watcher", "--config", str(config), "--log-format", "json", "run"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(lambda: any("READY=1" in m for _, m in watchdog.got), timeout=60, what="READY=1")
            _tones(inbox, 0, 6)
            wait_for(lambda: _done(pg_url) >= 1, timeout=60, what="a first file done")

            proxy.cut()
            cut_at, cut_wall = time.monotonic(), time.time()
            lags: list[float] = []
            healed_at = healed_wall = done_in_partition = None
            arrived = False
            # a stalled loop records its lag only once it runs again: sampled on for 1.5 s after the heal
            while healed_at is None or time.monotonic() < healed_at + 1.5:
                if not arrived and time.monotonic() - cut_at >= 3:
                    _tones(inbox, 6, 1)  # a file settles during the partition: its recording waits off the loop
                    arrived = True
                if healed_at is None and time.monotonic() - cut_at >= PARTITION_SECONDS:
                    healed_at, healed_wall = time.monotonic(), time.time()
                    done_in_partition = _done(pg_url)
                    proxy.heal()
                lag = _lag(metrics)
                if lag is not None:
                    lags.append(lag)
                time.sleep(0.1)  # sleep-ok: the sampling step over a fixed window, not a synchronisation
            assert healed_at is not None and healed_wall is not None
            pings = watchdog.pings(cut_at, healed_at)
            gaps = [b - a for a, b in zip([cut_at, *pings], [*pings, healed_at], strict=True)]
            assert len(lags) > 50 and max(lags) < 1.0, f"loop lag during the partition: max {max(lags):.3f} s"
            assert len(pings) >= PARTITION_SECONDS - 2 and max(gaps) < 2.0, f"watchdog gaps {max(gaps):.2f} s"

            _tones(inbox, 7, 1)  # and one after the heal
            wait_for(lambda: _done(pg_url) == 8, timeout=90, what="every file done after the heal")
            assert daemon.poll() is None, "the daemon exited"
            recovered = time.monotonic() - healed_at
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=60)
            watchdog.close()
        events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        assert code == 0
        stalls = [e for e in events if e.get("event") == "loop.stalled" and cut_wall <= _when(e) <= healed_wall + 1]
        assert not stalls, f"the loop stalled during the partition: {stalls}"
        assert not [e for e in events if e.get("event") == "daemon.component_failed"]
        print(
            f"partition {PARTITION_SECONDS:.0f} s: loop lag max {max(lags):.3f} s over {len(lags)} samples, "
            f"{len(pings)} watchdog pings (largest gap {max(gaps):.2f} s), {done_in_partition} done by the heal, "
            f"all 8 done {recovered:.1f} s after it"
        )


@pytest.mark.serial
@pytest.mark.timeout(120)
def test_a_call_cut_off_ends_with_store_unavailable_and_the_store_works_once_healed(pg_url, proxy):
    """The adapter alone, its call deadline shortened to 3 s: a call during the partition raises StoreUnavailable
    after about the deadline (never a hang), naming the store without its password; after the heal the same store
    answers again (its broken connection replaced)."""
    store = PostgresStore(proxy.url(pg_url))
    try:
        store._pool.call_seconds = 3.0
        assert store.next_due("analyze") is None
        proxy.cut()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="did not answer") as caught:
            store.next_due("analyze")
        took = time.monotonic() - started
        assert 2.5 < took < 12.0, f"the call ended after {took:.1f} s"
        assert "127.0.0.1" in str(caught.value)
        proxy.heal()
        assert store.next_due("analyze") is None
        assert store.counts() == {}
    finally:
        proxy.heal()
        store.close()
