"""The launchd property list, read back with plistlib as launchd would read it."""

from __future__ import annotations

import plistlib
from pathlib import Path

import pytest

PLIST = Path(__file__).resolve().parent.parent / "launchd" / "org.watcher.daemon.plist"


@pytest.fixture(scope="module")
def plist() -> dict:
    """The parsed plist."""
    with PLIST.open("rb") as fh:
        return plistlib.load(fh)


def test_label_matches_the_file_name(plist):
    """launchctl finds the job by its label, which must equal the file's name."""
    assert plist["Label"] == "org.watcher.daemon" == PLIST.stem


def test_runs_the_console_script_with_a_config(plist):
    """ProgramArguments run `watcher run --config FILE` with JSON logs, by absolute paths."""
    args = plist["ProgramArguments"]
    assert all(isinstance(a, str) for a in args)
    assert args[0].startswith("/") and args[0].endswith("/bin/watcher")
    assert args[1] == "run"
    config = args[args.index("--config") + 1]
    assert config.startswith("/") and config.endswith(".toml")
    assert args[args.index("--log-format") + 1] == "json"
    assert plist["EnvironmentVariables"] == {"WATCHER_CONFIG": config}, "the same config file either way"


def test_restarts_only_after_a_failure(plist):
    """Started at load; restarted after a crash or non-zero exit, not after a clean stop; throttled."""
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert isinstance(plist["ThrottleInterval"], int) and plist["ThrottleInterval"] >= 10
    assert isinstance(plist["ExitTimeOut"], int) and plist["ExitTimeOut"] > 10, "the 10 s checkpoint must fit"
    assert plist["ProcessType"] == "Background"


def test_logs_and_umask(plist):
    """stdout and stderr go to an absolute .log file; new files are not world-readable."""
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert isinstance(plist[key], str) and plist[key].startswith("/") and plist[key].endswith(".log")
    assert plist["Umask"] == 0o027


def test_holds_no_api_key(plist):
    """No key is passed through the environment of a file any local user can read."""
    assert not any("KEY" in name.upper() for name in plist["EnvironmentVariables"])


def test_install_steps_name_the_extras_and_the_log_folder():
    """The install comment installs [local,metrics] and creates the log folder launchd will not create."""
    text = PLIST.read_text()
    assert '[local,metrics]"' in text
    with PLIST.open("rb") as fh:
        log_dir = str(Path(plistlib.load(fh)["StandardOutPath"]).parent)
    assert f"mkdir -p /usr/local/etc/watcher {log_dir}" in text
