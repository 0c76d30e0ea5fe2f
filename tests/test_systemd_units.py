"""The systemd units: verified and scored by systemd-analyze, and their hardening checked against what watcher needs.

systemd-analyze is required in CI (the env var CI is set; .ci/run installs Debian's systemd package) and
skipped elsewhere when missing. ``verify`` insists that ExecStart's binary exists, and watcher is not
installed at /opt/watcher here: the tests verify a temporary copy whose ExecStart names a stub
``watcher`` script instead, with every argument kept. Unknown users (User=watcher) are not checked by verify.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
INSTALLED = "/opt/watcher/.venv/bin/watcher"
UNITS = {"watcher.service": "watcher.service", "watcher@.service": "watcher@example.service"}
MAX_EXPOSURE = 2.0


def analyze() -> str:
    """The systemd-analyze binary; missing, it skips the test locally and fails it in CI."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing in CI (.ci/run installs Debian's systemd package)")
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return tool


def directives(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file (keys may repeat), comments and section headers left out."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def unit(name: str) -> dict[str, list[str]]:
    return directives((SYSTEMD / name).read_text())


@pytest.fixture
def unit_copy(tmp_path: Path):
    """A copy of a unit (a template as the instance ``example``) whose ExecStart binary is a stub that exists."""
    stub = tmp_path / "bin" / "watcher"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)

    def copy(name: str) -> Path:
        text = (SYSTEMD / name).read_text()
        assert text.count(INSTALLED) == 1
        target = tmp_path / UNITS[name]
        target.write_text(text.replace(INSTALLED, str(stub)))
        return target

    return copy


@pytest.mark.parametrize("name", list(UNITS))
def test_unit_verifies(name, unit_copy):
    """systemd-analyze verify reports nothing at all for the unit."""
    proc = subprocess.run([analyze(), "verify", str(unit_copy(name))], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


@pytest.mark.parametrize("name", list(UNITS))
def test_unit_exposure_is_at_most_2(name, unit_copy):
    """systemd-analyze security --offline=true rates the unit at an overall exposure of 2.0 or lower."""
    path = unit_copy(name)
    proc = subprocess.run(
        [analyze(), "security", "--offline=true", str(path)], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr
    level = float(match.group(1))
    print(f"{name}: overall exposure level {level}")
    assert level <= MAX_EXPOSURE, proc.stdout


@pytest.mark.parametrize("name", list(UNITS))
def test_unit_contract(name):
    """Type=notify with a watchdog, reload by SIGHUP, keys by credentials, a dedicated user, strict hardening."""
    d = unit(name)
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "60s",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "2",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "User": "watcher",
        "ConfigurationDirectory": "watcher",
        "ProtectSystem": "strict",
        "ProtectHome": "read-only",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "ProtectProc": "invisible",
        "ProcSubset": "pid",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "UMask": "0027",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures": "native",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], (key, d.get(key))
    assert "@system-service" in d["SystemCallFilter"]
    assert "DynamicUser" not in d and "IPAddressDeny" not in d
    stop = d["TimeoutStopSec"][0]
    assert stop.endswith("s") and int(stop[:-1]) > 10, "the daemon's 10 s checkpoint must fit"
    instance = "%i" if "@" in name else None
    config = f"/etc/watcher/{instance}.toml" if instance else "/etc/watcher/config.toml"
    assert d["ExecStart"] == [f"{INSTALLED} run --config {config} --log-format json"]
    assert d["StateDirectory"] == ([f"watcher/{instance}"] if instance else ["watcher"])
    folder = f"/etc/watcher/credentials/{instance}/" if instance else "/etc/watcher/credentials/"
    assert d["LoadCredential"] == [
        f"essentia_api_key:{folder}essentia_api_key",
        f"neuralanalog_api_key:{folder}neuralanalog_api_key",
        f"pgpass:{folder}pgpass",
    ]
    assert d["ReadWritePaths"] == ["-/srv/audio/inbox -/srv/audio/output"]
    assert "Environment" not in d, "keys come by LoadCredential=, never by Environment="


@pytest.mark.parametrize("name", list(UNITS))
def test_every_credential_is_optional(name):
    """Each LoadCredential= has a blank SetCredential= of the same name: systemd's default when the file is absent."""
    d = unit(name)
    loaded = [v.split(":", 1)[0] for v in d["LoadCredential"]]
    assert d["SetCredential"] == [f"{cred}:\\n" for cred in loaded]


def test_blank_credential_means_no_key(tmp_path, monkeypatch):
    """A blank credential (the units' default) is no key at all; a credential with a key is that key."""
    from watcher.config import load_settings

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "essentia_api_key").write_text("\n")
    (creds / "neuralanalog_api_key").write_text("na-key\n")
    settings = load_settings(None, {"CREDENTIALS_DIRECTORY": str(creds)}, state_dir=tmp_path / "state")
    assert settings.analysis.api_key is None
    assert settings.archive.api_key is not None and settings.archive.api_key.get_secret_value() == "na-key"


@pytest.mark.parametrize("name", list(UNITS))
def test_install_comment_installs_local_and_metrics(name):
    """The unit's install steps install the extras it is hardened for: local analysis and metrics."""
    assert 'pip install "/path/to/watcher[local,metrics]"' in (SYSTEMD / name).read_text()


def test_template_differs_only_where_an_instance_must():
    """The template carries exactly the same hardening as the plain unit: only names and paths differ."""
    plain, template = unit("watcher.service"), unit("watcher@.service")
    per_instance = {"Description", "ExecStart", "StateDirectory", "LoadCredential", "EnvironmentFile"}
    assert plain.keys() == template.keys()
    assert {k for k in plain if plain[k] != template[k]} == per_instance
    for key in per_instance:
        assert all("%i" in v for v in template[key]), key


def test_environment_example_holds_no_keys():
    """The environment file example documents WATCHER_ overrides and sends API keys to credentials instead."""
    text = (SYSTEMD / "watcher.env.example").read_text()
    assignments = [line for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#")]
    assert assignments == [], "every example line is commented out"
    assert "WATCHER_" in text and "CREDENTIALS_DIRECTORY" in text and "LoadCredential" in text
    assert not re.search(r"^#?\s*(ESSENTIA|NEURALANALOG)_API_KEY=", text, re.MULTILINE)


def test_proc_subset_pid_keeps_mountinfo(tmp_path):
    """Under /proc mounted as ProcSubset=pid, ProtectProc=invisible do, the filesystem type is still found."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        pytest.skip("needs Linux and unshare(1)")
    code = (
        "from watcher.detect.fstype import filesystem_type, inotify_max_user_watches\n"
        "print('RESULT', filesystem_type('/'), inotify_max_user_watches())\n"
    )
    script = 'mount -t proc -o subset=pid,hidepid=invisible proc /proc && exec "$0" -c "$1"'
    proc = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "sh", "-c", script, sys.executable, code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    if "RESULT" not in proc.stdout:
        pytest.skip(f"cannot mount a private /proc here (not root, or no namespaces): {proc.stderr.strip()[:200]}")
    fstype, watches = proc.stdout.split("RESULT", 1)[1].split()
    assert fstype not in ("None", "")
    assert watches == "None", "/proc/sys is hidden under ProcSubset=pid"


MDWE = """
import ctypes, importlib.util, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux 6.3+)
    print("UNSUPPORTED"); sys.exit(0)
import mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("NOT ENFORCED"); sys.exit(1)
except OSError:
    pass
import numpy as np
assert (np.ones((64, 64)) @ np.ones((64, 64)))[0, 0] == 64
if importlib.util.find_spec("essentia"):
    import essentia.standard as es
    assert es.RMS()(np.ones(1024, dtype=np.float32)) > 0.99
import watcher.cli, watcher.daemon
from watchdog.observers import Observer
observer = Observer(); observer.start(); observer.stop(); observer.join()
callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)
assert callback(1) == 2
print("OK")
"""


def test_memory_deny_write_execute_is_safe_for_watcher():
    """Under the kernel's own W^X lock (what MemoryDenyWriteExecute= enforces), numpy, Essentia and watcher run."""
    if sys.platform != "linux":
        pytest.skip("Linux only")
    proc = subprocess.run([sys.executable, "-c", MDWE], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if proc.stdout.strip() == "UNSUPPORTED":
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
