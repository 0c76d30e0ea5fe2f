"""Analysis by body against analysis by URL: bytes watcher uploads and time from drop to the last sidecar.

The same files are analysed twice by a fresh daemon against the emulator: once sent as request bodies, once
through ``audio_url_template`` with a loopback static server as the CDN (the emulator fetches each file from
it). ``--uplink-mbps`` throttles how fast the emulator reads request bodies, as a slow office uplink would;
the CDN side is not throttled. Reference, measured in the same run: curl downloading the same files from the
static server, which is what the service's fetches cost here.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _harness import DaemonInThread, quiet

from tests.cdn import StaticServer
from tests.conftest import write_silent_wav
from watcher.config import AnalysisConfig, FolderConfig, Settings
from watcher.emulator import Emulator


def run(root: Path, sources: list[Path], template: str, uplink_mbps: float) -> tuple[float, int, int]:
    """One daemon over a fresh folder: (seconds from drop to the last sidecar, body bytes received, requests)."""
    inbox = root / "in"
    with Emulator(use_local=False) as emu:
        if uplink_mbps:
            emu.analysis.faults.read_delay = 65536 / (uplink_mbps * 1e6 / 8)
        settings = Settings(
            state_dir=root / "state",
            folders=(FolderConfig(path=inbox, settle_seconds=0),),
            analysis=AnalysisConfig(
                base_url=emu.url, api_key="bench-key", rate_limit=100, concurrency=2, audio_url_template=template
            ),
        )
        daemon = DaemonInThread(settings)
        started = time.perf_counter()
        for src in sources:
            src.rename(inbox / src.name)
        for src in sources:
            sidecar = inbox / (src.name + ".analysis.json")
            while not sidecar.exists():
                time.sleep(0.005)
        took = time.perf_counter() - started
        daemon.stop()
        return took, emu.analysis.bytes_received, len(emu.analysis.inputs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--mib", type=float, default=32, help="size of each file")
    parser.add_argument("--uplink-mbps", type=float, default=100.0, help="emulated upload speed (0: unthrottled)")
    args = parser.parse_args()
    quiet()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        master = [write_silent_wav(root / "src" / f"{i}.wav", args.mib) for i in range(args.files)]
        for i, path in enumerate(master):  # distinct contents: the gate would pay identical ones once
            with path.open("r+b") as fh:
                fh.seek(-8, 2)
                fh.write(i.to_bytes(8, "big"))
        size = sum(p.stat().st_size for p in master)
        rows = []
        for mode in ("body", "url"):
            work = root / mode
            (work / "in").mkdir(parents=True)
            copies = [Path(shutil.copy(p, work / p.name)) for p in master]
            with StaticServer({"/cdn": work / "in"}) as cdn:
                template = f"{cdn.url}/cdn/{{relpath}}" if mode == "url" else ""
                rows.append((mode, *run(work, copies, template, args.uplink_mbps)))
                started = time.perf_counter()
                for p in master:
                    subprocess.run(["curl", "-sf", "-o", "/dev/null", f"{cdn.url}/cdn/{p.name}"], check=True)
                curl = time.perf_counter() - started
    link = f"throttled to {args.uplink_mbps:g} Mbit/s" if args.uplink_mbps else "unthrottled (loopback)"
    print(f"{args.files} files x {args.mib:g} MiB, uplink to the service {link}")
    for mode, took, sent, requests in rows:
        print(f"  {mode:4}: drop -> last sidecar {took:6.2f} s; body bytes uploaded {sent / 2**20:8.1f} MiB; "
              f"requests {requests}")
    print(f"  reference: curl downloads the same files from the loopback CDN in {curl:.2f} s"
          f" ({size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
