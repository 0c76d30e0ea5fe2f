"""Soak: a daemon fed a file a second for an hour (new files, overwrites, deletions, seeded faults on a share
of requests, the page's live feed open), printing its RSS (and its anonymous and file-backed parts), open files
and threads every minute.

Memory must not grow with work done: the last RSS should be within 15 MB of its value after warm-up, and the
slope of RSS over files (least squares over the lines after warm-up, and over their second half) flat. The
daemon (`watcher run`, analysis with the web page on) runs in its own process, the emulator (fake results)
in this one. ``--rate 20 --seconds 150`` gives a quick look at the per-file growth;
``--tracemalloc DIR`` starts the daemon under tracemalloc and writes a snapshot after warm-up and at the end
(compare them with ``python -m bench.soak --compare DIR``) to find what holds per-file state.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.burst import _answers, free_port, variants, wait_for
from tests.conftest import write_tone
from watcher.emulator import Emulator

# The daemon, with a SIGUSR2 handler that writes a tracemalloc snapshot (bench only).
TRACED = """
import runpy, signal, sys, tracemalloc
out = sys.argv.pop(1)
tracemalloc.start(12)
shots = [0]
def dump(*_):
    shots[0] += 1
    tracemalloc.take_snapshot().dump(f"{out}/snapshot-{shots[0]}.bin")
signal.signal(signal.SIGUSR2, dump)
sys.argv[0] = "watcher"
runpy.run_module("watcher", run_name="__main__")
"""


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of ``/proc/PID/status`` in MB: ``VmRSS``, or its parts ``RssAnon`` (the heaps: Python's,
    malloc's, SQLite's page caches) and ``RssFile`` (mapped files: libraries, the store's shared memory)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slope(samples: list[tuple[int, float]]) -> float | None:
    """The least-squares slope of RSS over files dropped, in MB per 1,000 files (None with fewer than 3 lines)."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mean_x = sum(x for x, _ in samples) / n
    mean_y = sum(y for _, y in samples) / n
    spread = sum((x - mean_x) ** 2 for x, _ in samples)
    if spread == 0:
        return None
    return round(1000 * sum((x - mean_x) * (y - mean_y) for x, y in samples) / spread, 3)


def follow_events(url: str, token: str, stop: threading.Event) -> None:
    """The page's live feed, held open as a browser tab would (reconnecting if the daemon closes it)."""
    while not stop.is_set():
        try:
            auth = {"Authorization": f"Bearer {token}"}
            with httpx.stream("GET", url + "/api/events", headers=auth, timeout=httpx.Timeout(5, read=60)) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        return
        except httpx.HTTPError:
            stop.wait(1)


def compare(folder: Path, top: int = 25) -> None:
    import tracemalloc

    shots = sorted(folder.glob("snapshot-*.bin"), key=lambda p: int(p.stem.split("-")[1]))
    first, last = tracemalloc.Snapshot.load(str(shots[0])), tracemalloc.Snapshot.load(str(shots[-1]))
    for stat in last.compare_to(first, "traceback")[:top]:
        print(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks")
        for line in stat.traceback.format()[-8:]:
            print("    " + line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3600)
    parser.add_argument("--minutes", type=float, help="the run's length in minutes (instead of --seconds)")
    parser.add_argument("--rate", type=float, default=1.0, help="files dropped per second")
    parser.add_argument("--warmup", type=float, default=120, help="seconds before the reference RSS is read")
    parser.add_argument("--report", type=float, default=60, help="seconds between lines")
    parser.add_argument("--fail-share", type=float, default=0.05, help="share of requests that meet a fault")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tracemalloc", type=Path)
    parser.add_argument("--compare", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare:
        compare(args.compare)
        return
    if args.minutes is not None:
        args.seconds = args.minutes * 60
    rng = random.Random(args.seed)
    print(f"soak: seed {args.seed}, {args.rate:g} files/s for {args.seconds:g} s", flush=True)
    total = int(args.seconds * args.rate) + 10
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inbox = root / "in"
        inbox.mkdir()
        template = write_tone(root / "tone.wav", 0.25).read_bytes()
        contents = variants(template, total * 2)
        web_port = free_port()
        emulator = Emulator(use_local=False).start()  # fake results; seeded faults on a share of requests
        emulator.chaos(args.seed, args.fail_share)
        url = emulator.url
        token = "soak-token-" + "x" * 24
        config = root / "config.toml"
        config.write_text(
            f'state_dir = "{root / "state"}"\nlog_level = "info"\n'
            f'[[folders]]\npath = "{inbox}"\nsettle_seconds = 0.2\nrescan_interval = 300\n'
            f'[analysis]\nbase_url = "{url}"\napi_key = "bench-key"\nbackend = "remote"\n'
            "[archive]\nenabled = false\n"
            f'[web]\nlisten = "127.0.0.1:{web_port}"\ntoken = "{token}"\n'
        )
        daemon = None
        stop = threading.Event()
        try:
            traced = ["-c", TRACED, str(args.tracemalloc.resolve())] if args.tracemalloc else ["-m", "watcher"]
            if args.tracemalloc:
                args.tracemalloc.mkdir(parents=True, exist_ok=True)
            daemon = subprocess.Popen(
                [sys.executable, *traced, "--config", str(config), "--log-format", "json", "run"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")},
            )
            web = f"http://127.0.0.1:{web_port}"
            wait_for("the page", lambda: _answers(web), time.monotonic() + 120)
            threading.Thread(target=follow_events, args=(web, token, stop), daemon=True).start()
            started = time.monotonic()
            next_report = started + args.report
            reference: float | None = None
            samples: list[tuple[int, float]] = []  # (files dropped, RSS MB) at each line after warm-up
            names: list[str] = []
            dropped = 0
            heads = ("min", "files", "RSS MB", "anon MB", "file MB", "open files", "threads")
            print(" ".join(f"{h:>{w}}" for h, w in zip(heads, (6, 7, 8, 8, 8, 10, 7), strict=True)), flush=True)
            while time.monotonic() - started < args.seconds:
                tick = started + dropped / args.rate
                time.sleep(max(0.0, tick - time.monotonic()))  # sleep-ok: the bench's own pace
                roll = rng.random()
                if names and roll < 0.1:  # an overwrite in place: a new revision of the same path
                    (inbox / rng.choice(names)).write_bytes(contents[total + dropped])
                elif names and roll < 0.15:  # a deletion
                    victim = names.pop(rng.randrange(len(names)))
                    (inbox / victim).unlink(missing_ok=True)
                else:
                    name = f"{dropped:06d}.wav"
                    (root / name).write_bytes(contents[dropped])
                    os.rename(root / name, inbox / name)
                    names.append(name)
                dropped += 1
                now = time.monotonic()
                if reference is None and now - started >= args.warmup:
                    reference = rss_mb(daemon.pid)
                    if args.tracemalloc:
                        daemon.send_signal(signal.SIGUSR2)
                if now >= next_report:
                    next_report += args.report
                    minutes, rss, fds = (now - started) / 60, rss_mb(daemon.pid), open_files(daemon.pid)
                    anon, mapped = rss_mb(daemon.pid, "RssAnon"), rss_mb(daemon.pid, "RssFile")
                    if reference is not None:
                        samples.append((dropped, rss))
                    line = f"{minutes:6.1f} {dropped:7d} {rss:8.1f} {anon:8.1f} {mapped:8.1f} {fds:10d}"
                    print(f"{line} {threads(daemon.pid):7d}", flush=True)
                if daemon.poll() is not None:
                    raise SystemExit(f"the daemon exited with {daemon.returncode}")
            last = rss_mb(daemon.pid)
            if args.tracemalloc:
                daemon.send_signal(signal.SIGUSR2)
                time.sleep(2)  # sleep-ok: the snapshot is written by the daemon
        finally:
            stop.set()
            if daemon is not None:
                daemon.terminate()
                daemon.wait(20)
            emulator.stop()
    if reference is not None:
        after = dropped - int(args.warmup * args.rate)
        print(
            json.dumps(
                {
                    "files": dropped,
                    "rss_after_warmup_mb": round(reference, 1),
                    "rss_last_mb": round(last, 1),
                    "growth_mb": round(last - reference, 1),
                    "growth_kb_per_file": round((last - reference) * 1024 / max(after, 1), 2),
                    "slope_mb_per_1000_files": slope(samples),
                    "slope_mb_per_1000_files_second_half": slope(samples[len(samples) // 2 :]),
                    "target": "growth within 15 MB",
                }
            )
        )


if __name__ == "__main__":
    main()
