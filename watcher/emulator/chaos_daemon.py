"""The chaos scenario's daemon: its configuration, and ``python -m watcher run`` as a subprocess that is
started, killed (SIGKILL) and restarted, logging JSON lines to one file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from watcher.emulator.chaos import ChaosPlan

ANALYSIS_KEY = "chaos-analysis-key"
PROCESSING_KEY = "chaos-processing-key"
START_MARK = "chaos.daemon_start"  # written to the daemon's log before each start


def write_config(plan: ChaosPlan, url: str) -> Path:
    """The daemon's TOML: one fast-settling folder, analysis and archive through the emulator, quick retries."""
    root = plan.root
    cfg = root / "watcher.toml"
    cfg.write_text(
        f"""state_dir = {json.dumps(str(root / "state"))}
log_level = "info"

[[folders]]
path = {json.dumps(str(root / "inbox"))}
settle_seconds = 0.2
rescan_interval = 3600

[analysis]
backend = "remote"
base_url = {json.dumps(url)}
concurrency = 4
rate_limit = 500

[archive]
enabled = true
base_url = {json.dumps(url)}
versions = ["original", "mastered"]
output_dir = {json.dumps(str(root / "out"))}
concurrency = 4
rate_limit = 500
poll_initial = 0.2
poll_max = 0.5

[retry]
max_attempts = 50
backoff_initial = 0.1
backoff_max = 0.5
needs_user_backoff = 5
""",
        "utf-8",
    )
    return cfg


class DaemonProcess:
    """``python -m watcher --config CFG run`` as a subprocess, logging (JSON lines) to one appended file."""

    def __init__(self, plan: ChaosPlan, cfg: Path) -> None:
        self.plan = plan
        self.cfg = cfg
        self.log_path = plan.root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
        self.env.update(ESSENTIA_API_KEY=ANALYSIS_KEY, NEURALANALOG_API_KEY=PROCESSING_KEY)

    def watcher(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run one CLI command against the same config and state (status, retry)."""
        command = [self.plan.python, "-m", "watcher", "--config", str(self.cfg), "--log-format", "json", *args]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> None:
        command = [self.plan.python, "-m", "watcher", "--config", str(self.cfg), "--log-format", "json", "run"]
        with self.log_path.open("ab") as log:
            log.write(f'{{"event": "{START_MARK}", "start": {self.starts + 1}}}\n'.encode())
            log.flush()
            self.proc = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1

    def ready(self) -> bool:
        """Whether the running process has logged ``daemon.ready`` (its first scan is done)."""
        try:
            text = self.log_path.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return False
        return "daemon.ready" in text.rpartition(START_MARK)[2]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop within 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def until(condition: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    """Poll ``condition`` until true or ``timeout`` seconds pass; returns whether it came true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)  # sleep-ok: the polling step of a deadline-bounded wait
    return True
