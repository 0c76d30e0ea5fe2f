"""The command line as a user runs it: real processes, signals, exit codes, and no secret in any output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import API_KEY, wait_for, write_tone
from watcher import __version__

pytestmark = pytest.mark.timeout(60)


def cli_env(tmp_path: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env.update(
        WATCHER_STATE_DIR=str(tmp_path / "state"),
        WATCHER_ANALYSIS__BASE_URL=url,
        ESSENTIA_API_KEY=API_KEY,
        PYTHONUNBUFFERED="1",
    )
    return env


def watcher(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watcher", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_version():
    """--version prints the package version."""
    proc = subprocess.run([sys.executable, "-m", "watcher", "--version"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == f"watcher {__version__}"


def test_run_then_sigterm_exits_0_quickly(tmp_path, inbox, emulator):
    """`watcher run` writes a sidecar, then SIGTERM makes it exit 0 within 10 s; its JSON logs hold no key."""
    env = cli_env(tmp_path, emulator.url)
    env["WATCHER_LOG_LEVEL"] = "debug"
    cfg = tmp_path / "watcher.toml"
    cfg.write_text(f'[[folders]]\npath = "{inbox}"\nsettle_seconds = 0.3\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "watcher", "--config", str(cfg), "--log-format", "json", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        write_tone(inbox / "a.wav", 0.3)
        wait_for(lambda: (inbox / "a.wav.analysis.json").exists(), timeout=30)
        emulator.analysis.faults.event_delay = 2.0  # the next analysis is in flight when SIGTERM arrives
        write_tone(inbox / "b.wav", 0.3, freq=300)
        wait_for(lambda: emulator.api.counts()["POST /v1/analysis/stream"] == 2, timeout=30)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert elapsed < 10
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    events = [e["event"] for e in lines]
    assert "daemon.stopping" in events and "daemon.checkpointed" in events and "daemon.stopped" in events
    assert API_KEY not in out + err
    for e in lines:
        if e["event"].startswith(("analyze.", "file.", "job.")):
            assert "path" in e, e


def test_scan_exit_codes_and_status(tmp_path, inbox, emulator):
    """`scan` exits 0 when all succeeded and 1 when a file failed; status and retry see the failure."""
    env = cli_env(tmp_path, emulator.url)
    write_tone(inbox / "good.wav", 0.2)
    ok = watcher("--log-format", "json", "scan", str(inbox), env=env)
    assert ok.returncode == 0, ok.stderr
    assert (inbox / "good.wav.analysis.json").exists()

    (inbox / "bad.wav").write_text("not audio at all")
    bad = watcher("--log-format", "json", "scan", str(inbox), env=env)
    assert bad.returncode == 1
    assert "bad.wav" in bad.stderr and "not audio" in bad.stderr

    status = watcher("status", "--json", env=env)
    assert status.returncode == 0
    data = json.loads(status.stdout)
    assert data["counts"]["analyze"] == {"done": 1, "failed": 1}
    (problem,) = data["problems"]
    assert problem["path"].endswith("bad.wav") and problem["error_code"] == "bad_input"
    human = watcher("status", env=env)
    assert "bad.wav" in human.stdout and "not audio" in human.stdout
    assert API_KEY not in status.stdout + human.stdout

    shutil.copy(inbox / "good.wav", inbox / "bad.wav")  # the user fixes the file: a new revision
    retry = watcher("retry", "--failed", env=env)
    assert retry.returncode == 0 and "1 job(s)" in retry.stdout
    fixed = watcher("scan", str(inbox), env=env)
    assert fixed.returncode == 0, fixed.stderr
    assert emulator.api.counts()["POST /v1/analysis/stream"] == 1  # same content as good.wav: from the store


def test_run_without_folder_is_a_usage_error(tmp_path, emulator):
    """No folder on the command line and none configured: exit 2 with a hint."""
    proc = watcher("run", env=cli_env(tmp_path, emulator.url))
    assert proc.returncode == 2
    assert "no folder to watch" in proc.stderr


def test_retry_needs_a_target(tmp_path, emulator, inbox):
    """`retry` with neither paths nor --failed says what it needs."""
    env = cli_env(tmp_path, emulator.url)
    write_tone(inbox / "x.wav", 0.1)
    assert watcher("scan", str(inbox), env=env).returncode == 0
    proc = watcher("retry", env=env)
    assert proc.returncode == 2 and "PATH..., --failed or --in-doubt" in proc.stderr


def test_a_reader_that_went_away_ends_the_command_quietly_with_141(tmp_path):
    """`watcher status --json | head -c 10`: the reader closes the pipe; the command ends as a shell reports one
    its pipe ended (141), saying nothing (it said "cannot start: Broken pipe" with exit 3 and logged a start-up
    failure)."""
    state = tmp_path / "state"
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'state_dir = "{state}"\n[analysis]\napi_key = "k"\nbase_url = "http://127.0.0.1:9"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "watcher", "--config", str(cfg), "completion", "bash"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before it writes: its first write meets a closed pipe
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert err == ""
