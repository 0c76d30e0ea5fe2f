"""What the benchmarks share: a daemon on its own event loop in a thread, and quiet logging."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from watcher.config import Settings
from watcher.daemon import Daemon
from watcher.log import configure_logging


def quiet() -> None:
    configure_logging("json", "error", stream=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the run


class DaemonInThread:
    """Start a daemon in the background; ``stop()`` asks it to stop and waits."""

    def __init__(self, settings: Settings) -> None:
        self.daemon = Daemon(settings, handle_signals=False)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.daemon.run(),), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.daemon.stop.set)
        self.thread.join(15)
