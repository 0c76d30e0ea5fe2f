"""Time from a complete file's rename into a watched folder to the start of its analysis request.

A file written elsewhere on the same disk is renamed into the natively watched folder of a `watcher run`
process; the emulator (in this process) stamps the analysis request's arrival (headers received). The
figure is arrival - rename - settle window: what detection, the store, the runner and the pipeline add
beyond the window the user asked for.

References measured in the same run, on the same folder and the same emulator: a bare watchdog observer's
rename -> event delivery, and a bare httpx POST (keep-alive, a small body): start -> arrival, and round trip.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from _harness import quiet
from watchdog.events import FileCreatedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from tests.conftest import write_tone
from watcher.emulator import Emulator

STREAM_ROUTE = "POST /v1/analysis/stream"
WARM_UP = 3


def summary(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[max(0, -(-len(ms) * 95 // 100) - 1)]  # nearest rank
    return f"{name:<44} p50 {statistics.median(ms):7.1f} ms   p95 {p95:7.1f} ms   max {ms[-1]:7.1f} ms   (n={len(ms)})"


def wait(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit("timed out: the daemon did not answer in time")
        time.sleep(0.0005)


def product(root: Path, emu: Emulator, files: int, settle: float) -> list[float]:
    """rename -> analysis request arrival, minus the settle window, for ``files`` files, one at a time.

    The daemon runs as its own process (`watcher run`), as in production: in this process it would share
    the interpreter lock with the emulator's server thread, and its arrivals would wait for that lock.
    """
    inbox, staging = root / "in", root / "staging"
    inbox.mkdir()
    cfg = root / "watcher.toml"
    cfg.write_text(
        f'state_dir = "{root / "state"}"\nlog_level = "warning"\n'
        f'[[folders]]\npath = "{inbox}"\nsettle_seconds = {settle}\n'
        f'[analysis]\nbackend = "remote"\nbase_url = "{emu.url}"\napi_key = "bench-key"\nrate_limit = 1000\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    log = open(root / "daemon.log", "wb")  # noqa: SIM115 - the child keeps it
    daemon = subprocess.Popen([sys.executable, "-m", "watcher", "--config", str(cfg), "run"], env=env, stdout=log,
                              stderr=subprocess.STDOUT)  # fmt: skip
    times = []
    try:
        for i in range(WARM_UP + files):
            src = write_tone(staging / f"{i}.wav", 0.5, freq=100 + i)  # a different content each: no dedup
            target = inbox / src.name
            before = sum(1 for r in emu.api.requests if r.route == STREAM_ROUTE)
            renamed = time.monotonic()
            os.rename(src, target)
            wait(lambda n=before: sum(1 for r in emu.api.requests if r.route == STREAM_ROUTE) > n)
            arrived = [r.arrived for r in emu.api.requests if r.route == STREAM_ROUTE][before]
            sidecar = target.with_name(target.name + ".analysis.json")
            wait(sidecar.exists)  # the next file meets an idle daemon
            if i >= WARM_UP:
                times.append(arrived - renamed - settle)
    finally:
        daemon.terminate()
        daemon.wait(30)
        log.close()
    return times


def bare_observer(folder: Path, files: int) -> list[float]:
    """A bare watchdog observer on ``folder``: rename -> its event delivered to the handler."""
    staging = folder.parent / "staging-bare"
    delivered: dict[str, float] = {}
    got = threading.Condition()

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            # moved in from outside the watched folder, inotify's IN_MOVED_TO arrives as a creation
            if isinstance(event, FileMovedEvent | FileCreatedEvent):
                path = event.dest_path if isinstance(event, FileMovedEvent) else event.src_path
                with got:
                    delivered.setdefault(os.fsdecode(path), time.monotonic())
                    got.notify_all()

    observer = Observer()
    observer.schedule(Handler(), str(folder), recursive=True)
    observer.start()
    times = []
    try:
        for i in range(files):
            src = write_tone(staging / f"bare-{i}.wav", 0.5, freq=2000 + i)
            target = str(folder / src.name)
            renamed = time.monotonic()
            os.rename(src, target)
            with got:
                if not got.wait_for(lambda t=target: t in delivered, 10):  # type: ignore[misc]
                    raise SystemExit("the bare observer saw no event")
            times.append(delivered[target] - renamed)
    finally:
        observer.stop()
        observer.join(5)
    return times


def bare_post(emu: Emulator, requests: int) -> tuple[list[float], list[float]]:
    """A bare httpx POST to the emulator's analysis route (refused at once: a wrong key), keep-alive:
    (start -> arrival at the emulator, whole round trip)."""
    arrivals, round_trips = [], []
    body = b"\0" * 1024
    with httpx.Client(base_url=emu.url, timeout=10) as client:
        client.post("/v1/analysis/stream", params={"models": "key"}, content=body)  # open the connection
        for _ in range(requests):
            started = time.monotonic()
            client.post("/v1/analysis/stream", params={"models": "key"}, content=body)
            round_trips.append(time.monotonic() - started)
            arrivals.append(emu.api.requests[-1].arrived - started)
    return arrivals, round_trips


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--settle", type=float, default=0.2, help="the folder's settle_seconds (subtracted)")
    args = parser.parse_args()
    quiet()
    with tempfile.TemporaryDirectory() as tmp, Emulator(analysis_key="bench-key", use_local=False) as emu:
        root = Path(tmp)
        times = product(root, emu, args.files, args.settle)
        observer = bare_observer(root / "in", args.files)
        post_arrival, post_round_trip = bare_post(emu, args.files)
    print(f"{args.files} files renamed one at a time into a natively watched folder, settle_seconds = {args.settle:g}")
    print(summary("watcher: rename -> request start - settle", times))
    print(summary("reference: bare watchdog rename -> event", observer))
    print(summary("reference: bare httpx POST start -> arrival", post_arrival))
    print(summary("reference: bare httpx POST round trip", post_round_trip))


if __name__ == "__main__":
    main()
