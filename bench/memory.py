"""Peak memory of `watcher scan` while it streams a 1 GiB file to the analysis emulator.

The emulator runs in its own process; the figure is the watcher process's own peak RSS (VmHWM, read
from /proc while it runs).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import httpx


def vm_hwm_kib(pid: int) -> int:
    """The process's peak resident size so far (Linux), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith("VmHWM")), 0)
    except OSError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--port", type=int, default=18766)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inbox = root / "in"
        inbox.mkdir()
        audio = inbox / "big.wav"
        with wave.open(str(audio), "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(44100)
            block = os.urandom(1 << 20)
            for _ in range(args.mib):
                w.writeframes(block)
        size = audio.stat().st_size
        emulator = subprocess.Popen(
            [sys.executable, "-m", "watcher", "emulate", "--fake-analysis", "--port", str(args.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{args.port}"
            deadline = time.monotonic() + 20
            while True:
                try:
                    httpx.get(url + "/")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            env = dict(
                os.environ,
                WATCHER_STATE_DIR=str(root / "state"),
                ESSENTIA_API_KEY="bench-key",
                WATCHER_ANALYSIS__BASE_URL=url,
            )
            started = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "watcher", "--log-format", "json", "scan", str(inbox)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            peak_kib = 0
            while proc.poll() is None:  # VmHWM only grows: its last reading before exit is the peak
                peak_kib = max(peak_kib, vm_hwm_kib(proc.pid))
                time.sleep(0.02)
            stderr = proc.stderr.read() if proc.stderr else ""
            elapsed = time.perf_counter() - started
        finally:
            emulator.terminate()
            emulator.wait(10)
        if proc.returncode != 0:
            print(stderr[-2000:])
            raise SystemExit(f"scan failed with exit {proc.returncode}")
        assert (inbox / "big.wav.analysis.json").exists()
    print(
        f"file: {size / 2**30:.2f} GiB WAV; scan (hash + stream + sidecar): {elapsed:.1f} s, "
        f"{size / elapsed / 2**20:.0f} MiB/s"
    )
    print(f"peak RSS of the watcher process: {peak_kib / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
