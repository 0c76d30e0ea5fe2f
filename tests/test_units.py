"""The service definitions: systemd units verified and scored by systemd-analyze, the launchd plist read back."""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = {"watcher.service": "watcher.service", "watcher@.service": "watcher@example.service"}


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing in CI (.ci/run installs Debian's systemd package)")
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return tool


@pytest.fixture
def unit_copy(tmp_path):
    """A copy of a unit (a template as an instance) whose ExecStart points at a binary that exists here."""

    def copy(name: str) -> Path:
        text = (ROOT / "systemd" / name).read_text()
        target = tmp_path / UNITS[name]
        target.write_text(text.replace("/opt/watcher/.venv/bin/watcher", shutil.which("true") or "/bin/true"))
        return target

    return copy


@pytest.mark.parametrize("name", list(UNITS))
def test_unit_verifies(name, unit_copy):
    """systemd-analyze verify finds nothing wrong (ExecStart rewritten, since watcher is not installed at /opt)."""
    proc = subprocess.run([analyze(), "verify", str(unit_copy(name))], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


@pytest.mark.parametrize("name", list(UNITS))
def test_unit_exposure_is_at_most_2(name, unit_copy):
    """systemd-analyze security --offline rates the unit 2.0 or lower."""
    proc = subprocess.run(
        [analyze(), "security", "--offline=true", str(unit_copy(name))], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr
    assert float(match.group(1)) <= 2.0, proc.stdout


@pytest.mark.parametrize("name", list(UNITS))
def test_unit_contract(name):
    """Type=notify with a watchdog, reload by SIGHUP, keys by credentials, a dedicated user."""
    text = (ROOT / "systemd" / name).read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=watcher",
        "LoadCredential=essentia_api_key:",
        "LoadCredential=neuralanalog_api_key:",
        "ProtectSystem=strict",
        "ReadWritePaths=",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "RestrictAddressFamilies=",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=\n",
    ):
        assert line in text, line
    assert "API_KEY=" not in text.replace("_api_key:", "")


def test_launchd_plist():
    """The plist loads, restarts only after a failure, is throttled, and logs to files."""
    with (ROOT / "launchd" / "org.watcher.daemon.plist").open("rb") as fh:
        plist = plistlib.load(fh)
    assert plist["Label"] == "org.watcher.daemon"
    assert plist["ProgramArguments"][0].endswith("/bin/watcher") and plist["ProgramArguments"][1] == "run"
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert isinstance(plist["ThrottleInterval"], int) and plist["ThrottleInterval"] >= 10
    assert plist["StandardOutPath"].endswith(".log") and plist["StandardErrorPath"].endswith(".log")
    assert plist["RunAtLoad"] is True
    assert plist["EnvironmentVariables"]["WATCHER_CONFIG"].endswith(".toml")
