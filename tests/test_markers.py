"""Folder ownership markers: a second store on an owned folder is refused, says why, and `watcher adopt` takes
the folder over deliberately. Works for SQLite stores (two single-machine daemons on one share) and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import API_KEY, wait_for, write_tone
from watcher import markers


def test_an_unmarked_folder_is_marked_once_and_read_back(tmp_path):
    """The first claim writes the marker; later claims by the same store read the same folder ID; another store
    is told the folder is not its own, and why."""
    folder = tmp_path / "share"
    folder.mkdir()
    first = markers.claim(folder, "sqlite:one", "host-a")
    assert first.ours and first.owner == "sqlite:one" and first.reason is None
    data = json.loads((folder / markers.MARKER).read_text())
    assert data["store"] == "sqlite:one" and data["folder_id"] == first.folder_id
    assert markers.claim(folder, "sqlite:one", "host-b").folder_id == first.folder_id
    other = markers.claim(folder, "sqlite:two", "host-c")
    assert not other.ours and other.owner == "sqlite:one"
    assert "owned by another store (sqlite:one)" in (other.reason or "")
    assert json.loads((folder / markers.MARKER).read_text()) == data  # the refused store wrote nothing
    adopted = markers.adopt(folder, "sqlite:two", "host-c")
    assert adopted.ours and adopted.folder_id == first.folder_id
    assert json.loads((folder / markers.MARKER).read_text())["previous_store"] == "sqlite:one"
    assert [p.name for p in folder.iterdir()] == [markers.MARKER]  # no temp file left behind


def test_store_id_of_a_sqlite_store_is_kept_beside_it(tmp_path):
    """A SQLite store's ID is made once and kept in its state folder."""
    one = markers.store_id(None, tmp_path / "state")
    assert one.startswith("sqlite:") and markers.store_id(None, tmp_path / "state") == one
    assert markers.store_id(None, tmp_path / "other") != one


def _config(tmp_path: Path, name: str, inbox: Path, url: str, store_url: str = "") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'state_dir = "{tmp_path / name}"\n[[folders]]\npath = "{inbox}"\nsettle_seconds = 0.3\n'
        f'[analysis]\nbackend = "remote"\nbase_url = "{url}"\napi_key = "{API_KEY}"\n'
        + (f'[store]\nurl = "{store_url}"\nnode_name = "{name}"\n' if store_url else "")
    )
    return path


def _watcher(config: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    return subprocess.run(
        [sys.executable, "-m", "watcher", "--config", str(config), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_second_store_on_an_owned_folder_is_refused_until_adopted(tmp_path, inbox, emulator, pg_url):
    """A daemon with its own SQLite store marks the share; a PostgreSQL-backed daemon (and a second SQLite one) on
    the same share refuse to touch it and say why; doctor explains the fix; `watcher adopt` takes it over."""
    first = _config(tmp_path, "first", inbox, emulator.url)
    second = _config(tmp_path, "second", inbox, emulator.url)
    shared = _config(tmp_path, "shared", inbox, emulator.url, pg_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "watcher", "--config", str(first), "run"],
        env={k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        write_tone(inbox / "a.wav", 0.2)
        wait_for((inbox / "a.wav.analysis.json").exists, timeout=30, what="the first daemon's sidecar")
        owner = json.loads((inbox / markers.MARKER).read_text())["store"]
        assert owner.startswith("sqlite:")
        assert not (inbox / f"{markers.MARKER}.analysis.json").exists()  # the marker is never work
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for config in (second, shared):
        refused = _watcher(config, "run")
        assert refused.returncode == 2
        assert "owned by another store" in refused.stderr and "watcher adopt" in refused.stderr
        assert "owned_by_another_store" in refused.stdout + refused.stderr  # logged, naming the folder
    doctor = _watcher(shared, "doctor")
    assert "owned by another store" in doctor.stdout and f"watcher adopt {inbox}" in doctor.stdout
    adopted = _watcher(shared, "adopt", str(inbox))
    assert adopted.returncode == 0, adopted.stderr
    assert "now owned by this store (postgresql:" in adopted.stdout and owner in adopted.stdout
    marker = json.loads((inbox / markers.MARKER).read_text())
    assert marker["store"].startswith("postgresql:") and marker["previous_store"] == owner
    refused = _watcher(first, "run")
    assert refused.returncode == 2 and "owned by another store (postgresql:" in refused.stderr


def test_a_daemon_skips_only_the_folder_another_store_owns(tmp_path, emulator, run_daemon):
    """With one of two folders owned by another store, the daemon works on the other one, never touches the
    owned one, and `watcher status` shows it as owned by another store."""
    from tests.conftest import make_settings
    from watcher.commands import status
    from watcher.config import FolderConfig

    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    theirs.mkdir()
    markers.claim(theirs, "sqlite:someone-else", "other-host")
    settings = make_settings(tmp_path, mine, emulator.url)
    settings = settings.model_copy(
        update={"folders": (*settings.folders, FolderConfig(path=theirs, settle_seconds=0.3, rescan_interval=3600))}
    )
    write_tone(theirs / "b.wav", 0.2, freq=500)
    d = run_daemon(settings)
    write_tone(mine / "a.wav", 0.2)
    wait_for((mine / "a.wav.analysis.json").exists, timeout=30, what="the sidecar in the folder it owns")
    report = status(settings)
    d.stop()
    assert not (theirs / "b.wav.analysis.json").exists()
    assert all(f["path"] != str(theirs / "b.wav") for f in report["files"])
    shown = {f["folder"]: f for f in report["folders"]}
    assert "owned by another store (sqlite:someone-else)" in shown[str(theirs)]["reason"]
    assert shown[str(theirs)]["available"] is False
