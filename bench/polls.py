"""Uploads and status polls sharing the processing service's rate: 1,000 files through the archive pipeline
(default settings) while the emulated service answers every status "in progress" forever and enforces
10 requests/s per API key. Over a fixed window: uploads/s, polls/s and 429s, beside the service's limit.

Polls should never take more than half of the rate, and uploads should get the rest.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

from _harness import DaemonInThread, quiet

from tests.conftest import write_tone
from watcher.config import AnalysisConfig, ArchiveConfig, FolderConfig, Settings
from watcher.emulator import Emulator

KEY = "bench-key"
UPLOAD, POLL = "POST /from-file", "GET /status"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0, help="the measuring window, from the daemon's start")
    parser.add_argument("--limit", type=float, default=10.0, help="requests/s the emulator allows per key")
    parser.add_argument("--burst", type=float, default=None, help="the emulator's burst (default: --limit)")
    args = parser.parse_args()
    quiet()
    with tempfile.TemporaryDirectory() as tmp, Emulator(processing_key=KEY, use_local=False) as emu:
        emu.processing.faults.polls_needed = 10**9  # in progress forever
        emu.limit(args.limit, burst=args.burst)
        root = Path(tmp)
        inbox = root / "in"
        for i in range(args.files):
            write_tone(inbox / f"{i:05}.wav", 0.05, freq=100 + i * 0.37)
        cfg = ArchiveConfig(enabled=True, base_url=emu.url, api_key=KEY, output_dir=root / "out")
        settings = Settings(
            state_dir=root / "state",
            folders=(FolderConfig(path=inbox, settle_seconds=0),),
            analysis=AnalysisConfig(enabled=False),
            archive=cfg,
        )
        daemon = DaemonInThread(settings)
        start = time.monotonic()
        time.sleep(args.seconds)  # sleep-ok: a fixed measuring window
        end = time.monotonic()
        daemon.stop()
        window = [r for r in emu.api.requests if start <= r.arrived <= end]
    admitted = Counter(r.route for r in window if not r.refused)
    refused = Counter(r.route for r in window if r.refused)
    seconds = end - start
    print(
        f"{args.files} files, archive defaults (rate_limit {cfg.rate_limit:g}/s, concurrency {cfg.concurrency}, "
        f"poll_initial {cfg.poll_initial:g} s); emulator: in progress forever, limit {args.limit:g}/s per key"
    )
    print(
        f"over {seconds:.0f} s: uploads {admitted[UPLOAD]} ({admitted[UPLOAD] / seconds:.2f}/s), "
        f"polls {admitted[POLL]} ({admitted[POLL] / seconds:.2f}/s), all admitted "
        f"{sum(admitted.values()) / seconds:.2f}/s; limit {args.limit:g}/s"
    )
    print(f"429s: {sum(refused.values())} ({dict(refused)})")


if __name__ == "__main__":
    main()
