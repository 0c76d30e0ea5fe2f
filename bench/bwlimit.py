"""Bandwidth limit: a 16 MiB upload by watcher's processing client under ``bwlimit = "4M"``, beside
``curl --limit-rate 4M -T`` to the same loopback endpoint in the same run, and beside the unlimited upload.

The endpoint is bench/upload.py's discard server (its own process), which answers once the whole body has
arrived, so each figure is the time until the service had every byte. The expected time at 4 MiB/s is printed
too: size / rate (curl's bucket and ours both start with a small burst, so a little under it is right).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.upload import discard_server
from watcher.audiofile import UPLOAD_CHUNK, FileBody, signature
from watcher.config.bwlimit import parse_bwlimit
from watcher.sending import WireTicket, issue
from watcher.services.bandwidth import Bandwidth
from watcher.services.http import HttpPolicy
from watcher.services.neuralanalog import NeuralAnalogClient


async def watcher_upload(url: str, path: Path, limit: str) -> float:
    """Seconds until the service answered one upload under ``bwlimit = limit``."""
    table = parse_bwlimit(limit)
    bandwidth = None if table.is_off else Bandwidth(table)
    policy = HttpPolicy(rate_per_second=100.0, concurrency=1, read_timeout=600.0, bandwidth=bandwidth)
    async with NeuralAnalogClient(url, "bench-key", policy) as client:
        client.http.client  # noqa: B018 - the session a running daemon already has
        issue(WireTicket(0, ("upload",)))  # the bench stands in for the gate: one ticket for this one upload
        started = time.perf_counter()
        await client.upload(FileBody(path, signature(path), chunk_size=UPLOAD_CHUNK))
        return time.perf_counter() - started


def curl_upload(url: str, path: Path, limit: str) -> float:
    """Seconds of one ``curl --limit-rate LIMIT -T`` (curl reads 4M as 4 MiB/s, as rclone and watcher do)."""
    started = time.perf_counter()
    subprocess.run(
        ["curl", "-sS", "-o", os.devnull, "-H", "Expect:", "--limit-rate", limit, "-T", str(path), url + "/from-file"],
        check=True,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--limit", default="4M")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed for the reference figure")
    rate = parse_bwlimit(args.limit).at(0).up
    if rate is None:
        raise SystemExit("--limit must limit uploads")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "big.wav"
        block = os.urandom(1 << 20)
        with path.open("wb") as fh:
            for _ in range(args.mib):
                fh.write(block)
        with discard_server(root) as url:
            free = asyncio.run(watcher_upload(url, path, "off"))
            ours, curls = [], []
            for _ in range(args.rounds):
                ours.append(asyncio.run(watcher_upload(url, path, args.limit)))
                curls.append(curl_upload(url, path, args.limit))
    size = args.mib * (1 << 20)
    print(f"upload of {args.mib} MiB to a loopback discard server, limit {args.limit} ({rate / (1 << 20):g} MiB/s)")
    rows = [
        ("expected at the limit", f"{size / rate:.2f} s"),
        (f"watcher, bwlimit = {args.limit!r}", ", ".join(f"{t:.2f} s" for t in ours)),
        (f"curl --limit-rate {args.limit} (reference)", ", ".join(f"{t:.2f} s" for t in curls)),
        ("watcher, no limit", f"{free:.3f} s"),
    ]
    width = max(len(name) for name, _ in rows) + 2
    for name, value in rows:
        print(f"{name + ':':<{width}}{value}")


if __name__ == "__main__":
    main()
