"""A million revisions: the page, its API and `watcher status` stay fast, a restart over 100,000 files
stays near `find`, and the daemon stays small and quiet.

Builds a SQLite store of ``--files`` revisions (done, failed, waiting and replaced ones, in eight archive
folders, with key and tempo; a fast bulk insert through SQL, the store's triggers keeping its counts) plus a
watched tree of ``--tree-files`` small files recorded as done, then starts `watcher run` on the tree (polled,
the page on) and prints: the overview's and the file list's p95, one file's page p95, search by key and by
tempo p95, `watcher status` (text) time, the restart (spawn to READY, sent once the first scan is done, minus the
same daemon's on an empty folder: what the files add; medians of ``--restarts``; also to idle, which includes the
runner taking up the store's waiting jobs) beside one `find` over the tree, the daemon's RSS, and its CPU while
idle and polling.

    python bench/scale.py [--files 1000000] [--tree-files 100000] [--requests 200] [--idle-seconds 60]

For a quick check on a shared machine: ``--files 50000 --tree-files 5000 --requests 50 --idle-seconds 10``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _proc
import httpx

KEYS = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
FOLDERS = 8


def build_store(db_path: Path, revisions: int, tree: Path, tree_files: list[Path], now: float) -> None:
    """The store: ``revisions`` synthetic revisions in eight archive folders, then the tree's files, done."""
    from watcher.store import Store

    Store(db_path).close()  # created and migrated by the adapter, as the daemon finds it
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    keys = ",".join(f"'{k}'" for k in KEYS)
    db.execute(
        f"""
        WITH RECURSIVE s(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM s WHERE k < {revisions})
        INSERT INTO files (id, folder, path, rel_path, size, mtime_ns, inode, sha256, current, created_at,
                           music_key, music_scale, bpm)
        SELECT k, '/archive/f' || (k % {FOLDERS}), '/archive/f' || (k % {FOLDERS}) || '/d' || (k / 1000) || '/t'
               || k || '.wav', 'd' || (k / 1000) || '/t' || k || '.wav', 1000 + k, k, k, printf('%064d', k),
               k % 20 != 0, {now} - k,
               CASE WHEN k % 100 < 90 THEN json_extract(json_array({keys}), '$[' || (k % 12) || ']') END,
               CASE WHEN k % 100 < 90 THEN CASE k % 2 WHEN 0 THEN 'major' ELSE 'minor' END END,
               CASE WHEN k % 100 < 90 THEN 60 + ((k * 7) % 1400) / 10.0 END
        FROM s
        """
    )
    for pipeline, step, every in (("analyze", "analyze", 1), ("archive", "check", 4)):
        db.execute(
            f"""
            INSERT INTO jobs (file_id, pipeline, step, state, attempts, next_attempt_at, last_error, error_code,
                              updated_at)
            SELECT id, '{pipeline}', '{step}',
                   CASE WHEN current = 0 THEN 'superseded' WHEN id % 100 < 90 THEN 'done'
                        WHEN id % 100 < 93 THEN 'failed' ELSE 'pending' END,
                   CASE WHEN id % 100 BETWEEN 90 AND 92 THEN 3 ELSE 0 END,
                   {now} + 3600 + id % 3600,
                   CASE WHEN id % 100 BETWEEN 90 AND 92 THEN 'bench: the content is not audio' END,
                   CASE WHEN id % 100 BETWEEN 90 AND 92 THEN 'bad_input' END,
                   {now} - (id * 37 % 86400)
            FROM files WHERE id % {every} = 0
            """
        )
    rows = []
    for p in tree_files:
        st = p.stat()
        rows.append((str(tree), str(p), os.path.relpath(p, tree), st.st_size, st.st_mtime_ns, st.st_ino, now - 90000))
    db.executemany(
        "INSERT INTO files (folder, path, rel_path, size, mtime_ns, inode, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    db.execute(
        "INSERT INTO jobs (file_id, pipeline, step, state, next_attempt_at, updated_at) "
        f"SELECT id, 'analyze', 'analyze', 'done', 0, {now} - 90000 FROM files WHERE folder=?",
        (str(tree),),
    )
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.close()


def p95(samples: list[float]) -> str:
    return f"p95 {statistics.quantiles(samples, n=20)[-1] * 1000:.1f} ms (p50 {statistics.median(samples) * 1000:.1f})"


def timed(client: httpx.Client, n: int, ask: Callable[[int], tuple[str, dict[str, str]]]) -> list[float]:
    """``n`` GETs (URL and query from ``ask(i)``), each checked for a 200, timed one by one."""
    out = []
    for i in range(n):
        url, params = ask(i)
        start = time.perf_counter()
        r = client.get(url, params=params)
        out.append(time.perf_counter() - start)
        if r.status_code != 200:
            raise SystemExit(f"{url} {params}: {r.status_code} {r.text[:200]}")
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1_000_000, help="revisions in the store, the tree's included")
    parser.add_argument("--tree-files", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200, help="requests per measure")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=30.0, help="the tree's poll interval")
    parser.add_argument("--restarts", type=int, default=3, help="restarts timed (medians)")
    args = parser.parse_args()
    tree_dir = _proc.HERE
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tree = root / "tree"
        tree.mkdir()
        started = time.perf_counter()
        paths = _proc.make_files(tree, args.tree_files)
        state = root / "state"
        state.mkdir()
        build_store(state / "watcher.db", args.files - args.tree_files, tree, paths, time.time())
        print(f"built {args.files:,} revisions and {args.tree_files:,} files in {time.perf_counter() - started:.0f} s")

        empty = root / "empty"
        empty.mkdir()
        # the fixed start: the same daemon (polled, the page on) over an empty folder, spawn to idle
        env_empty = _proc.env_for(tree_dir, root / "state-empty", empty, poll=True, interval=args.interval, web=True)
        fixed, fixed_ready = [], []
        for run in range(args.restarts + 1):  # the first creates the store and fills the bytecode cache: not counted
            with _proc.running(tree_dir, empty, env_empty, root) as daemon:
                ready_at = daemon.wait_ready()
                if run:
                    fixed_ready.append(ready_at)
                    fixed.append(daemon.wait_quiet())
                daemon.stop()
        env = _proc.env_for(tree_dir, state, tree, poll=True, interval=args.interval, web=True)
        ready, idle, finds = [], [], []
        for run in range(args.restarts + 1):  # the first marks the folder: not counted; the last stays up
            finds.append(_proc.find_pass(tree)[0])
            daemon = _proc.Daemon(tree_dir, tree, env, root)
            try:
                ready.append(daemon.wait_ready(600))
                idle.append(daemon.wait_quiet(timeout=600))
                if run == args.restarts:
                    times = (ready[1:], idle[1:], fixed_ready, fixed, finds[1:])
                    measure(daemon, state, env, args, *(statistics.median(t) for t in times))
            finally:
                daemon.stop()


def measure(daemon: _proc.Daemon, state: Path, env: dict[str, str], args: argparse.Namespace, *times: float) -> None:
    """Everything measured against the running daemon."""
    ready, idle, fixed_ready, fixed, find_wall = times
    web = json.loads((state / "web.json").read_text())
    token = (state / "web-token").read_text().strip()
    client = httpx.Client(base_url=web["url"], headers={"Authorization": f"Bearer {token}"}, timeout=60)
    n = args.requests
    rng = random.Random(7)
    known = [r["path"] for r in client.get("/api/files", params={"folder": "/archive/f3"}).json()["files"]]
    synthetic = range(1, max(2, args.files - args.tree_files))
    known += [f"/archive/f{k % FOLDERS}/d{k // 1000}/t{k}.wav" for k in rng.sample(synthetic, min(n, len(synthetic)))]
    known = [p for p in known if int(p.rsplit("/t", 1)[1][:-4]) % 20]  # current revisions only
    known = known or [r["path"] for r in client.get("/api/files").json()["files"]]
    timed(client, 5, lambda i: ("/api/status", {}))  # warm: the first reads fill the page cache
    results = {
        "reference: /healthz (no store read)": timed(client, n, lambda i: ("/healthz", {})),
        "overview (/api/status + first /api/files)": timed(
            client, n, lambda i: ("/api/status", {}) if i % 2 else ("/api/files", {})
        ),
        "file list, pages 1-200 of a folder or all": timed(
            client,
            n,
            lambda i: ("/api/files", {"page": str(1 + i % 200)} | ({"folder": "/archive/f1"} if i % 2 else {})),
        ),
        "one file's page (/api/file)": timed(client, n, lambda i: ("/api/file", {"path": known[i % len(known)]})),
        "search by key (A minor, F#, ...)": timed(
            client, n, lambda i: ("/api/files", {"key": f"{KEYS[i % 12]} {('major', 'minor')[i % 2]}"})
        ),
        "search by tempo (a 1-BPM range)": timed(
            client, n, lambda i: ("/api/files", {"bpm_min": str(80 + i % 60), "bpm_max": str(81 + i % 60)})
        ),
    }
    html = timed(client, n // 4 or 1, lambda i: ("/file", {"path": known[i % len(known)]}))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "watcher", "--version"], env=env, capture_output=True, check=True)
    version_s = time.perf_counter() - start
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "watcher", "status"], env=env, capture_output=True, text=True)
    status_s = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr)
    backlog = [line.strip() for line in done.stdout.splitlines() if line.startswith("  analyze:") or "waiting" in line]
    rss = rss_mb(daemon.proc.pid)
    before, t0 = daemon.cpu(), time.perf_counter()
    time.sleep(args.idle_seconds)  # the measure itself: CPU used over this window, polling the tree
    cpu = (daemon.cpu() - before) / (time.perf_counter() - t0)
    print(f"store: {args.files:,} revisions; tree: {args.tree_files:,} files polled every {args.interval:g} s")
    for name, samples in results.items():
        print(f"{name}: {p95(samples)}")
    print(f"one file's HTML page (/file): {p95(html)}")
    print(
        f"`watcher status` (text, through the daemon): {status_s * 1000:.0f} ms   "
        f"| `watcher --version` (the start of any command): {version_s * 1000:.0f} ms"
    )
    for line in backlog[:3]:
        print(f"  {line}")
    scan = ready - fixed_ready
    print(
        f"restart over {args.tree_files:,} files (medians of {args.restarts}; find {find_wall * 1000:.0f} ms): "
        f"spawn -> READY (the first scan done) {ready * 1000:.0f} ms against {fixed_ready * 1000:.0f} ms on an empty "
        f"folder: the files add {scan * 1000:.0f} ms = {scan / find_wall:.1f} x find"
    )
    print(
        f"  spawn -> idle {idle * 1000:.0f} ms against {fixed * 1000:.0f} ms: {(idle - fixed) * 1000:.0f} ms = "
        f"{(idle - fixed) / find_wall:.1f} x find (after READY the runner also takes up the store's waiting jobs)"
    )
    print(f"daemon RSS after the requests: {rss:.0f} MB")
    print(f"idle CPU over {args.idle_seconds:g} s, polling: {cpu * 100:.2f} % of a core")


if __name__ == "__main__":
    main()
