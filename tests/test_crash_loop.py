"""A file that stops the daemon is not paid for at every restart.

A real `watcher run` process is SIGKILLed while the emulator holds its analysis stream open (billed, unanswered),
again and again, as a crash loop under a supervisor would: the stream is asked again twice, then held in doubt for
the user; the bill stays at three and `watcher retry` asks again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import API_KEY, wait_for, write_tone
from watcher.emulator import Emulator
from watcher.store.rules import CRASH_REASKS

pytestmark = pytest.mark.timeout(120)


def config(tmp_path: Path, inbox: Path, emu: Emulator) -> Path:
    path = tmp_path / "watcher.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[[folders]]\npath = "{inbox}"\nsettle_seconds = 0.3\nrescan_interval = 3600\n'
        f'[analysis]\nbackend = "remote"\nbase_url = "{emu.url}"\napi_key = "{API_KEY}"\nmodels = ["key"]\n'
        f"[retry]\nbackoff_initial = 0.2\nbackoff_max = 1.0\n"
    )
    return path


def watcher(cfg: Path, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """A real `watcher` process whose output is appended to ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    with open(log, "ab") as out:  # the child keeps its own descriptor
        cmd = [sys.executable, "-m", "watcher", "--config", str(cfg), *args]
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def status(cfg: Path) -> dict:
    run = subprocess.run([sys.executable, "-m", "watcher", "--config", str(cfg), "status", "--json"],
                         capture_output=True, check=True, timeout=60)
    return json.loads(run.stdout)


def streams(emu: Emulator) -> int:
    return sum(1 for c in emu.bill() if c.service == "analysis")


def test_a_crash_loop_on_one_file_is_held_after_two_reasks(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with Emulator(analysis_key=API_KEY, use_local=False) as emu:
        emu.analysis.faults.event_delay = 60.0  # every stream is billed, then held open far past a kill
        cfg = config(tmp_path, inbox, emu)
        write_tone(inbox / "crash.wav", 0.5)
        for death in range(1, CRASH_REASKS + 2):  # the first send, then each re-ask, dies mid-stream
            daemon = watcher(cfg, "run", log=tmp_path / "daemon.log")
            wait_for(lambda n=death: streams(emu) == n, timeout=60, what=f"stream {death} billed")
            daemon.send_signal(signal.SIGKILL)
            assert daemon.wait(timeout=30) == -signal.SIGKILL
        emu.analysis.faults.event_delay = 0.0
        daemon = watcher(cfg, "run", log=tmp_path / "daemon.log")
        try:
            held = wait_for(lambda: status(cfg).get("in_doubt"), timeout=60, what="the stream held in doubt")
            assert [e["path"] for e in held] == [str(inbox / "crash.wav")]
            (problem,) = status(cfg)["problems"]
            assert problem["state"] == "in_doubt" and f"in flight, {CRASH_REASKS + 1} times" in problem["error"]
            assert streams(emu) == CRASH_REASKS + 1  # held, not asked a fourth time
            assert not (inbox / "crash.wav.analysis.json").exists()
            retried = subprocess.run([sys.executable, "-m", "watcher", "--config", str(cfg), "retry",
                                      str(inbox / "crash.wav")], capture_output=True, timeout=60)
            assert retried.returncode == 0, retried.stderr
            wait_for((inbox / "crash.wav.analysis.json").exists, timeout=60, what="the sidecar after the retry")
            assert streams(emu) == CRASH_REASKS + 2
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=30) == 0
