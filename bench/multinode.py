"""Several nodes, one PostgreSQL store: files per second with 1, 2 and 3 daemons on one machine, the claims per
second one database serves, and the time a dead node's work takes to be taken over after a SIGKILL.

Each node is a real `watcher run` process with its own state folder, analysing one file at a time (like a node
with ``local_workers = 1``) against the emulator, whose streams take about 1 s per file (local-analysis-like).
A throwaway PostgreSQL cluster is started for the run (as the tests do) and removed after.

    .venv/bin/python bench/multinode.py [--files 30] [--lease 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from tests.conftest import API_KEY, write_tone
from tests.pg import Cluster, _bindir
from watcher.emulator import Emulator
from watcher.store.postgres import PostgresStore

SECONDS_PER_FILE = 1.0
EVENTS_PER_STREAM = 5  # started, three models, done


def config(root: Path, name: str, inbox: Path, emu: Emulator, url: str, lease: float) -> Path:
    path = root / f"{name}.toml"
    path.write_text(
        f'state_dir = "{root / name}"\nlog_level = "warning"\n'
        f'[[folders]]\npath = "{inbox}"\nsettle_seconds = 0.3\nrescan_interval = 3600\n'
        f'[analysis]\nbackend = "remote"\nbase_url = "{emu.url}"\napi_key = "{API_KEY}"\nconcurrency = 1\n'
        f"rate_limit = 100\n"
        f'[store]\nurl = "{url}"\nnode_name = "{name}"\nlease_seconds = {lease}\n'
    )
    return path


def start(root: Path, name: str, cfg: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    log = open(root / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen([sys.executable, "-m", "watcher", "--config", str(cfg), "run"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip


def one(url: str, sql: str, *args: object) -> object:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql, args or None).fetchone()  # type: ignore[arg-type]
    return None if row is None else row[0]


def wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)  # sleep-ok: polling step of a bounded wait


def drop(inbox: Path, n: int, offset: int = 0) -> None:
    staging = inbox.parent / "staging"
    for i in range(n):
        src = write_tone(staging / f"f{offset + i:04d}.wav", 0.2, freq=150 + 3 * (offset + i))
        os.rename(src, inbox / src.name)


def has_schema(url: str) -> bool:
    return bool(one(url, "SELECT COUNT(*) FROM pg_tables WHERE tablename='nodes'"))


def throughput(cluster: Cluster, emu: Emulator, nodes: int, files: int, lease: float) -> float:
    """Files per second, from the drop to the last job done."""
    url = cluster.database()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inbox = root / "inbox"
        inbox.mkdir()
        procs = [start(root, f"n{i}", config(root, f"n{i}", inbox, emu, url, lease)) for i in range(nodes)]
        try:
            wait(lambda: has_schema(url) and one(url, "SELECT COUNT(*) FROM nodes") == nodes, 60, "nodes")
            t0 = time.monotonic()
            drop(inbox, files)
            wait(lambda: one(url, "SELECT COUNT(*) FROM jobs WHERE state='done'") == files, 600, "all done")
            return files / (time.monotonic() - t0)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(60)


def takeover(cluster: Cluster, emu: Emulator, lease: float, runs: int = 3) -> list[float]:
    """Seconds from a SIGKILL of a node holding a job until another node holds that job (``runs`` times)."""
    return [_takeover_once(cluster, emu, lease, run) for run in range(runs)]


def _takeover_once(cluster: Cluster, emu: Emulator, lease: float, run: int) -> float:
    url = cluster.database()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inbox = root / "inbox"
        inbox.mkdir()
        procs = {n: start(root, n, config(root, n, inbox, emu, url, lease)) for n in ("victim", "survivor")}
        try:
            wait(lambda: has_schema(url) and one(url, "SELECT COUNT(*) FROM nodes") == 2, 60, "nodes")
            drop(inbox, 8, offset=1000 * (run + 1))
            held = "SELECT id FROM jobs WHERE lease_owner LIKE 'victim:%' AND state='pending' LIMIT 1"
            wait(lambda: one(url, held), 60, "the victim holding a job")
            job = one(url, held)
            procs["victim"].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            mine = "SELECT lease_owner LIKE 'survivor:%%' OR state='done' FROM jobs WHERE id=%s"
            wait(lambda: one(url, mine, job), 120, "the survivor taking the job")
            return time.monotonic() - killed
        except SystemExit:
            for name in procs:
                print(f"--- {name} log (tail) ---\n" + (root / f"{name}.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs.values():
                p.wait(60)


def claims_per_second(cluster: Cluster, threads: int = 8, jobs: int = 3000) -> float:
    """Claim-and-finish cycles per second one database serves to ``threads`` claimers (4 stores, as 4 nodes)."""
    url = cluster.database()
    stores = [PostgresStore(url, pool_size=threads // 4 + 1) for _ in range(4)]
    for i in range(jobs):
        stores[0].register_revision(folder="/s", path=f"/s/{i}.wav", rel_path=f"{i}.wav", size=1, mtime_ns=1, inode=i,
                                    jobs=[("analyze", "analyze")])  # fmt: skip
    done = [0] * threads

    def worker(n: int) -> None:
        store = stores[n % 4]
        while (job := store.claim("analyze", f"node{n % 4}:{n}:0")) is not None:
            store.release(job, state="done")
            done[n] += 1

    t0 = time.monotonic()
    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.monotonic() - t0
    for s in stores:
        s.close()
    assert sum(done) == jobs, (sum(done), jobs)
    return jobs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=30)
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--nodes", type=int, nargs="*", default=[1, 2, 3])
    args = parser.parse_args()
    bindir = _bindir()
    if bindir is None:
        raise SystemExit("no PostgreSQL server installed (Debian: apt-get install postgresql)")
    cluster = Cluster(bindir).start()
    try:
        with Emulator(analysis_key=API_KEY, use_local=False) as emu:
            emu.analysis.faults.event_delay = SECONDS_PER_FILE / EVENTS_PER_STREAM
            print(f"{args.files} files, ~{SECONDS_PER_FILE:g} s of analysis each, one at a time per node")
            print("| nodes | files/s | speed-up |\n|---|---|---|")
            base = None
            for n in args.nodes:
                rate = throughput(cluster, emu, n, args.files, args.lease)
                base = base or rate
                print(f"| {n} | {rate:.2f} | {rate / base:.2f}x |", flush=True)
            times = takeover(cluster, emu, args.lease)
            print(f"takeover after SIGKILL (lease {args.lease:g} s): median {statistics.median(times):.1f} s, "
                  f"runs {', '.join(f'{t:.1f}' for t in times)}")  # fmt: skip
        rate = claims_per_second(cluster)
        print(f"claims served by one database (claim + finish, 8 claimers on 4 stores): {rate:.0f}/s")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
