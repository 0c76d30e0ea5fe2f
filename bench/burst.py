"""A burst of N small WAVs dropped into a watched folder: time to all sidecars, files/s, and the daemon's CPU per file.

The daemon (`watcher run`, analysis only, JSON logs at info to /dev/null) and the analysis emulator (fake
results, answering at once) each run in their own process, so the emulator's CPU is not counted. The daemon's
CPU is read from /proc/<pid>/stat (user + system) after a warm-up file, and again when the last sidecar exists.
Every file has its own content (the store's result cache would otherwise answer copies without a request).
The reference printed beside the figure is the configured client rate limit (files/s can never pass it).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from tests.conftest import write_tone

TICK = os.sysconf("SC_CLK_TCK")
# The daemon under cProfile timed by its main thread's CPU (the event loop; worker threads are not seen).
PROFILED = """
import cProfile, runpy, sys, time
out = sys.argv.pop(1)
sys.argv[0] = "watcher"
profile = cProfile.Profile(time.thread_time)
profile.enable()
try:
    runpy.run_module("watcher", run_name="__main__")
except SystemExit:
    pass
finally:
    profile.disable()
    profile.dump_stats(out)
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: object, deadline: float) -> None:
    assert callable(check)
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def variants(template: bytes, count: int) -> list[bytes]:
    """``count`` valid WAVs of the same length, each with different content (its index in the last samples)."""
    return [template[:-8] + i.to_bytes(8, "little") for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=0.25, help="audio length of each file")
    parser.add_argument("--rate", type=float, default=None, help="[analysis] rate_limit (default: the config's)")
    parser.add_argument("--concurrency", type=int, default=None, help="[analysis] concurrency (default: the config's)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--profile", type=Path, help="run the daemon under cProfile, writing its stats here")
    parser.add_argument(
        "--py-spy", type=Path, help="sample the daemon's GIL holder with py-spy (on PATH) into this raw file"
    )
    args = parser.parse_args()
    from watcher.config import AnalysisConfig

    defaults = AnalysisConfig()
    rate = args.rate if args.rate is not None else defaults.rate_limit
    concurrency = args.concurrency if args.concurrency is not None else defaults.concurrency
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inbox, staging = root / "in", root / "staging"
        inbox.mkdir()
        staging.mkdir()
        template = write_tone(root / "tone.wav", args.seconds).read_bytes()
        for i, data in enumerate(variants(template, args.files + 1)):
            (staging / f"{i:05d}.wav").write_bytes(data)
        port = free_port()
        emulator = subprocess.Popen(
            [sys.executable, "-m", "watcher", "emulate", "--fake-analysis", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        config = root / "config.toml"
        config.write_text(
            f'state_dir = "{root / "state"}"\nlog_level = "info"\n'
            f'[[folders]]\npath = "{inbox}"\nsettle_seconds = 0\nrescan_interval = 3600\n'
            f'[analysis]\nbase_url = "{url}"\napi_key = "bench-key"\nbackend = "remote"\n'
            f"rate_limit = {rate}\nconcurrency = {concurrency}\n"
            "[archive]\nenabled = false\n"
        )
        daemon = None
        try:
            wait_for("the emulator", lambda: _answers(url), time.monotonic() + 20)
            profile = ["-c", PROFILED, str(args.profile.resolve())] if args.profile else ["-m", "watcher"]
            daemon = subprocess.Popen(
                [sys.executable, *profile, "--config", str(config), "--log-format", "json", "run"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")},
            )
            warm = staging / f"{args.files:05d}.wav"
            os.rename(warm, inbox / "warm-up.wav")
            wait_for("the warm-up sidecar", (inbox / "warm-up.wav.analysis.json").exists, time.monotonic() + 60)
            spy = None
            if args.py_spy:
                spy = subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "--pid",
                        str(daemon.pid),
                        "--format",
                        "raw",
                        "--rate",
                        "200",
                        "--threads",
                        "--gil",  # only the thread holding the GIL: what bounds the event loop
                        "--output",
                        str(args.py_spy.resolve()),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1)  # sleep-ok: py-spy attaches
            cpu0 = cpu_seconds(daemon.pid)
            started = time.perf_counter()
            for i in range(args.files):
                name = f"{i:05d}.wav"
                os.rename(staging / name, inbox / name)
            dropped = time.perf_counter() - started
            deadline = time.monotonic() + args.timeout
            for i in range(args.files - 1, -1, -1):  # the last dropped is the likeliest last done
                wait_for(f"sidecar {i}", (inbox / f"{i:05d}.wav.analysis.json").exists, deadline)
            elapsed = time.perf_counter() - started
            cpu = cpu_seconds(daemon.pid) - cpu0
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited with {daemon.returncode}")
        finally:
            for proc in (daemon, emulator):
                if proc is not None:
                    proc.terminate()
                    proc.wait(20)
    print(
        f"burst: {args.files} WAVs of {len(template) / 1e3:.0f} kB, analysis rate_limit {rate:g}/s, "
        f"concurrency {concurrency} (dropped in {dropped:.2f} s)"
    )
    print(f"all sidecars after {elapsed:.2f} s: {args.files / elapsed:.0f} files/s (configured limit: {rate:g}/s)")
    print(f"daemon CPU: {cpu:.2f} s, {cpu / args.files * 1000:.2f} ms per file")


def _answers(url: str) -> bool:
    try:
        httpx.get(url + "/")
        return True
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    main()
