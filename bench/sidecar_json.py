"""Encoding a sidecar (``json.dumps(indent=2, ensure_ascii=False)``) beside its whole atomic write (temp file,
fsync, rename), on real sidecars: the daemon analyses a few files against the emulator at default settings, then
each sidecar it wrote is read back, encoded again and again, and written again, to show what share of a
sidecar's cost the encoding is. (A hand-written encoder that saved about 0.1 ms of it was removed: bench/README.md.)

    .venv/bin/python bench/sidecar_json.py [--files 20] [--rounds 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _harness import DaemonInThread, quiet

from tests.conftest import write_tone
from watcher import fsutil
from watcher.config import AnalysisConfig, FolderConfig, Settings
from watcher.emulator import Emulator

KEY = "bench-key"


def per_call(fn: object, docs: list[object], rounds: int) -> float:
    """Seconds per encoding, the best of three passes over every document."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(rounds):
            for doc in docs:
                fn(doc)  # type: ignore[operator]
        best = min(best, (time.perf_counter() - started) / (rounds * len(docs)))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    quiet()
    with tempfile.TemporaryDirectory() as tmp, Emulator(analysis_key=KEY, use_local=False) as emu:
        root = Path(tmp)
        inbox = root / "in"
        for i in range(args.files):
            write_tone(inbox / f"Take {i:03} – café.wav", 0.2, freq=200 + i)
        settings = Settings(
            state_dir=root / "state",
            folders=(FolderConfig(path=inbox, settle_seconds=0),),
            analysis=AnalysisConfig(base_url=emu.url, api_key=KEY),
        )
        daemon = DaemonInThread(settings)
        deadline = time.monotonic() + 120
        while len(sidecars := sorted(inbox.glob("*.analysis.json"))) < args.files:
            if time.monotonic() > deadline:
                raise SystemExit("gave up waiting for the sidecars")
            time.sleep(0.2)
        daemon.stop()
        texts = [p.read_text("utf-8") for p in sidecars]
        docs = [json.loads(t) for t in texts]
        encode = per_call(lambda d: json.dumps(d, indent=2, ensure_ascii=False), docs, args.rounds)
        writes = 200
        started = time.perf_counter()
        for n in range(writes):
            fsutil.write_json_atomic(root / "out.json", docs[n % len(docs)])
        write = (time.perf_counter() - started) / writes
    sizes = sorted(len(t.encode()) for t in texts)
    median = sizes[len(sizes) // 2]
    print(f"{len(docs)} sidecars from the daemon at defaults, {sizes[0]}-{sizes[-1]} bytes (median {median})")
    print(f"encoding (json.dumps, indent=2, ensure_ascii=False): {encode * 1e6:.1f} µs per sidecar")
    print(f"the whole atomic write (encode, temp file, fsync, rename): {write * 1e6:.0f} µs per sidecar")
    print(f"the encoding's share of the write: {encode / write:.1%}")


if __name__ == "__main__":
    main()
