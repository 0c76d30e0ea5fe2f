"""Time from a file's close to its sidecar, with the emulator (fake results) and settle_seconds = 0.

With a zero settle window a file is ready after two identical stats one check tick apart, so the figure
is detection tick + store + hashing + one analysis request + the atomic sidecar write.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _harness import DaemonInThread, quiet

from tests.conftest import write_tone
from watcher.config import AnalysisConfig, FolderConfig, Settings
from watcher.emulator import Emulator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0, help="audio length of each file")
    args = parser.parse_args()
    quiet()
    with tempfile.TemporaryDirectory() as tmp, Emulator(use_local=False) as emu:
        root = Path(tmp)
        inbox = root / "in"
        inbox.mkdir()
        settings = Settings(
            state_dir=root / "state",
            folders=(FolderConfig(path=inbox, settle_seconds=0),),
            analysis=AnalysisConfig(base_url=emu.url, api_key="bench-key", rate_limit=100),
        )
        daemon = DaemonInThread(settings)
        sources = [write_tone(root / "src" / f"{i}.wav", args.seconds, freq=200 + i) for i in range(args.files)]
        times = []
        for src in sources:
            target = inbox / src.name
            data = src.read_bytes()
            with target.open("wb") as fh:
                fh.write(data)
            closed = time.perf_counter()
            sidecar = target.with_name(target.name + ".analysis.json")
            while not sidecar.exists():
                time.sleep(0.002)
            times.append(time.perf_counter() - closed)
        daemon.stop()
    times.sort()
    p95 = times[max(0, int(len(times) * 0.95) - 1)]
    print(f"files: {len(times)} x {args.seconds:g} s WAV ({len(data) / 1e6:.1f} MB each), settle_seconds = 0")
    print(
        f"close -> sidecar: median {statistics.median(times) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
        f"max {times[-1] * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
