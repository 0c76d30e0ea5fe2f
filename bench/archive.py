"""The archive pipeline against the emulator: time from drop to a filled output folder, and the requests
counted per file for a clean run and for each fault the emulator injects.

Polls start after 0.2 s (poll_initial) and jobs finish after one in-progress poll, so the time is
dominated by watcher's own work and the polling schedule, not by emulated processing.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _harness import DaemonInThread, quiet

from tests.conftest import write_tone
from watcher.config import AnalysisConfig, ArchiveConfig, FolderConfig, RetryConfig, Settings
from watcher.emulator import Emulator

VERSIONS = ("original", "restored", "mastered", "mastered_stems")
FAULTS = {
    "clean": {},
    "429 and 500 on polls": {"status_429": {"GET /status": 2}, "status_500": {"GET /status": 1}},
    "429 on the upload": {"status_429": {"POST /from-file": 1}},
    "mastering is_failed": {"failed_kinds": {"mastered"}},
    "email_notification_queued": {"email_queued": 2},
    "archive_incomplete": {"archive_incomplete": 1},
    "expired URL": {"expired_urls": 1},
}


def run(name: str, faults: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp, Emulator(use_local=False) as emu:
        for key, value in faults.items():
            setattr(emu.processing.faults, key, value)
        root = Path(tmp)
        inbox = root / "in"
        inbox.mkdir()
        settings = Settings(
            state_dir=root / "state",
            folders=(FolderConfig(path=inbox, settle_seconds=0),),
            analysis=AnalysisConfig(enabled=False),
            archive=ArchiveConfig(
                enabled=True,
                base_url=emu.url,
                api_key="k",
                output_dir=root / "out",
                versions=VERSIONS,
                poll_initial=0.2,
                poll_max=1.0,
            ),
            retry=RetryConfig(backoff_initial=0.5, backoff_max=2),
        )
        daemon = DaemonInThread(settings)
        src = write_tone(root / "take.wav", 5.0)
        data = src.read_bytes()
        with (inbox / "take.wav").open("wb") as fh:
            fh.write(data)
        dropped = time.perf_counter()
        manifest = root / "out" / "take" / "manifest.json"
        while not manifest.exists():
            time.sleep(0.005)
        elapsed = time.perf_counter() - dropped
        daemon.stop()
        counts = dict(sorted((emu.api.counts() + emu.storage.counts()).items()))
        print(f"{name}: drop -> output folder {elapsed:.2f} s; requests: {counts}")


def main() -> None:
    quiet()
    for name, faults in FAULTS.items():
        run(name, faults)


if __name__ == "__main__":
    main()
