"""`watcher doctor`: every check against real folders and the emulator, problems with their fixes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import API_KEY
from watcher.emulator import Emulator

pytestmark = pytest.mark.timeout(60)
PKEY = "proc-key-4567"


@pytest.fixture
def emu():
    with Emulator(analysis_key=API_KEY, processing_key=PKEY, use_local=False) as e:
        yield e


def doctor(tmp_path, emu, *, analysis_key=API_KEY, processing_key=PKEY, folders=()):
    cfg = tmp_path / "w.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path}/state"\n[analysis]\nbase_url = "{emu.url}"\napi_key = "{analysis_key}"\n'
        f'[archive]\nenabled = true\nbase_url = "{emu.url}"\napi_key = "{processing_key}"\n'
        f'output_dir = "{tmp_path}/out"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    return subprocess.run(
        [sys.executable, "-m", "watcher", "--config", str(cfg), "doctor", *map(str, folders)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_healthy_setup_exits_0(tmp_path, emu, inbox):
    """A readable local folder, free space and accepted keys: every line ok, exit 0."""
    proc = doctor(tmp_path, emu, folders=[inbox])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"folder {inbox}: " in proc.stdout and "native events" in proc.stdout
    assert "inotify watches" in proc.stdout
    assert proc.stdout.count("key accepted") == 2
    assert "no problems found" in proc.stdout
    requests = emu.api.counts()
    assert requests["POST /v1/analysis/stream (key check)"] == 1 and requests["POST /v1/analysis/stream"] == 0
    assert emu.analysis.bytes_received == 0 and not emu.paid()  # nothing analysed, nothing billed


def test_problems_are_printed_with_fixes(tmp_path, emu):
    """A missing folder and a refused key each print FAIL and a fix; the key itself is never printed."""
    proc = doctor(tmp_path, emu, analysis_key="wrong-analysis-key", folders=[tmp_path / "nope"])
    assert proc.returncode == 1
    assert f"[FAIL] folder {tmp_path / 'nope'}: does not exist" in proc.stdout
    assert "[FAIL] analysis service" in proc.stdout and "ESSENTIA_API_KEY" in proc.stdout
    assert "wrong-analysis-key" not in proc.stdout + proc.stderr
    assert "2 problem(s) found" in proc.stdout
