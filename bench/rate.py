"""A burst of small files to sidecars at the default settings, against the emulator enforcing the analysis
service's documented limit (10 requests/s per API key; a token bucket of one second's worth by default,
``--burst 1`` for a strict one): files/s beside that limit, the 429s it answered, and paid requests counted.

The emulator answers at once (fake results), so the service's limit is the only ceiling.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _harness import DaemonInThread, quiet

from tests.conftest import write_tone
from watcher.config import AnalysisConfig, FolderConfig, Settings
from watcher.emulator import Emulator

STREAM = "POST /v1/analysis/stream"
KEY = "bench-key"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--limit", type=float, default=10.0, help="requests/s the emulator allows per key")
    parser.add_argument("--burst", type=float, default=None, help="the emulator's burst (default: --limit)")
    args = parser.parse_args()
    quiet()
    with tempfile.TemporaryDirectory() as tmp, Emulator(analysis_key=KEY, use_local=False) as emu:
        limits = emu.limit(args.limit, burst=args.burst)
        assert limits is not None
        root = Path(tmp)
        inbox = root / "in"
        files = [write_tone(inbox / f"{i:05}.wav", 0.05, freq=100 + i * 0.37) for i in range(args.files)]
        settings = Settings(
            state_dir=root / "state",
            folders=(FolderConfig(path=inbox, settle_seconds=0),),
            analysis=AnalysisConfig(base_url=emu.url, api_key=KEY),
        )
        started = time.perf_counter()
        daemon = DaemonInThread(settings)
        deadline = started + args.files / args.limit * 4 + 60
        while sum(n.endswith(".analysis.json") for n in os.listdir(inbox)) < args.files:
            if time.perf_counter() > deadline:
                raise SystemExit("gave up waiting for the sidecars")
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
        daemon.stop()
        streams = [r for r in emu.api.requests if r.route == STREAM]
        admitted = sorted(r.arrived for r in streams if not r.refused)
        span = admitted[-1] - admitted[0]
        paid_twice = sum(1 for n in emu.paid().values() if n > 1)
        size = files[0].stat().st_size
    cfg = settings.analysis
    print(
        f"{args.files} files of {size} bytes, analysis defaults (rate_limit {cfg.rate_limit:g}/s, "
        f"concurrency {cfg.concurrency}); emulator limit {args.limit:g}/s per key, burst {args.burst or args.limit:g}"
    )
    rate = args.files / elapsed
    print(f"daemon start -> last sidecar: {elapsed:.1f} s = {rate:.2f} files/s (limit {args.limit:g}/s)")
    print(
        f"at the service: {len(admitted)} streams admitted over {span:.1f} s = {(len(admitted) - 1) / span:.2f}/s; "
        f"429s: {len(streams) - len(admitted)}; (content, model) pairs paid twice: {paid_twice}"
    )


if __name__ == "__main__":
    main()
