"""Driving the running daemon as a user does: real `watcher run` processes, the CLI, the control socket, reloads.

Scenario steps are listed in each test; every wait has a deadline, and money is counted at the emulator.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, query, wait_for, write_tone
from watcher.emulator import Emulator

pytestmark = pytest.mark.timeout(90)
PKEY = "processing-key-3e1d"
STREAM = "POST /v1/analysis/stream"
PAID_PROCESSING = ["POST /from-file", "POST /upscale-audio", "POST /master-audio", "POST /create-stems"]


@pytest.fixture
def emu():
    with Emulator(analysis_key=API_KEY, processing_key=PKEY, use_local=False) as e:
        e.processing.faults.polls_needed = 1
        yield e


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_") and not k.endswith("_API_KEY")}
    env.update(WATCHER_STATE_DIR=str(tmp_path / "state"), WATCHER_WEB__ENABLED="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def write_config(tmp_path: Path, body: str) -> Path:
    cfg = tmp_path / "watcher.toml"
    cfg.write_text(body)
    return cfg


def base_config(tmp_path: Path, inbox: Path, emu: Emulator, *, key_file: Path | None = None, extra: str = "") -> str:
    key = f'api_key_file = "{key_file}"' if key_file else f'api_key = "{API_KEY}"'
    return (
        f'[[folders]]\npath = "{inbox}"\nsettle_seconds = 0.3\n'
        f'[analysis]\nbase_url = "{emu.url}"\n{key}\n'
        "[retry]\nbackoff_initial = 0.2\nbackoff_max = 1.0\n" + extra
    )


def archive_section(tmp_path: Path, emu: Emulator, *, output: Path | None = None) -> str:
    return (
        f'[archive]\nenabled = true\nbase_url = "{emu.url}"\napi_key = "{PKEY}"\n'
        f'output_dir = "{output or tmp_path / "out"}"\nversions = ["original", "mastered"]\n'
        "poll_initial = 0.05\npoll_max = 0.2\n"
    )


def cli(*args: str, env: dict[str, str], cfg: Path | None = None, cwd: Path | None = None) -> Any:
    pre = ["--config", str(cfg)] if cfg else []
    return subprocess.run(
        [sys.executable, "-m", "watcher", *pre, *args], env=env, capture_output=True, text=True, timeout=60, cwd=cwd
    )


class DaemonProcess:
    """`watcher run` in its own process, its JSON log in a file."""

    def __init__(self, tmp_path: Path, cfg: Path, env: dict[str, str]) -> None:
        self.log = tmp_path / "daemon.log"
        self.state = tmp_path / "state"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "watcher", "--config", str(cfg), "--log-format", "json", "run"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: (self.state / "control.sock").exists() or self.proc.poll() is not None, timeout=30)
        assert self.proc.poll() is None, self.log.read_text()

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                doc = json.loads(line)
                if doc.get("event") == name:
                    found.append(doc)
        return found

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
        return self.proc.returncode


@pytest.fixture
def daemons():
    started: list[DaemonProcess] = []

    def start(tmp_path: Path, cfg: Path, env: dict[str, str]) -> DaemonProcess:
        d = DaemonProcess(tmp_path, cfg, env)
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=10)


def sidecar(audio: Path) -> Path:
    return audio.with_name(audio.name + ".analysis.json")


def test_scan_dot_from_the_folder_without_a_daemon(tmp_path, inbox, emu):
    """`watcher scan .` run inside the folder processes it (a relative path is the folder it names)."""
    write_tone(inbox / "a.wav", 0.3)
    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu))
    proc = cli("scan", ".", env=env_for(tmp_path), cfg=cfg, cwd=inbox)
    assert proc.returncode == 0, proc.stderr
    assert sidecar(inbox / "a.wav").exists()
    assert emu.api.counts()[STREAM] == 1


def test_scan_of_a_file_already_waiting_says_it_moved_it_to_the_front(tmp_path, inbox, emu):
    """A file an earlier run recorded (backlog, not processed yet): `watcher scan` of it says it moved 1 file to
    the front, and processes what waits; a second scan has nothing left to move and says nothing of it."""
    from watcher.store import Store

    for name in ("a.wav", "b.wav"):
        write_tone(inbox / name, 0.3, freq=300.0 if name == "a.wav" else 500.0)
    store = Store(tmp_path / "state" / "watcher.db")
    try:
        for path in sorted(inbox.iterdir()):
            st = path.stat()
            store.register_revision(
                folder=str(inbox), path=str(path), rel_path=path.name, size=st.st_size, mtime_ns=st.st_mtime_ns,
                inode=st.st_ino, jobs=[("analyze", "analyze")],
            )  # fmt: skip
    finally:
        store.close()
    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu))
    proc = cli("scan", "b.wav", env=env_for(tmp_path), cfg=cfg, cwd=inbox)
    assert proc.returncode == 0, proc.stderr
    assert "1 file(s) already waiting moved to the front" in proc.stdout
    assert sidecar(inbox / "a.wav").exists() and sidecar(inbox / "b.wav").exists()
    again = cli("scan", "b.wav", env=env_for(tmp_path), cfg=cfg, cwd=inbox)
    assert again.returncode == 0, again.stderr
    assert "moved to the front" not in again.stdout


def test_a_scan_of_a_paused_folder_says_so_and_exits_1(tmp_path, inbox, emu, daemons):
    """A file in a paused folder, scanned without a daemon and then through one: each scan records it, pays
    nothing, says the folder is paused and that the file is processed once it is resumed (naming the command),
    and exits 1 (the work asked is not done, as a script must learn). Resumed, both files are processed."""
    write_tone(inbox / "a.wav", 0.3)
    env, cfg = env_for(tmp_path), write_config(tmp_path, base_config(tmp_path, inbox, emu))
    assert cli("pause", str(inbox), env=env, cfg=cfg).returncode == 0
    told = f"watcher: {inbox} is paused: 1 file(s) recorded but not processed; they are processed when it is resumed"
    alone = cli("scan", str(inbox / "a.wav"), env=env, cfg=cfg)
    assert alone.returncode == 1, alone.stderr
    assert f"{told} (`watcher resume {inbox}`)" in alone.stderr
    assert query(tmp_path, "SELECT COUNT(*) FROM jobs WHERE state='pending'") == (1,)
    d = daemons(tmp_path, cfg, env)
    write_tone(inbox / "b.wav", 0.3, freq=500.0)
    through = cli("scan", str(inbox / "b.wav"), env=env, cfg=cfg)
    assert through.returncode == 1, through.stderr
    assert f"{told} (`watcher resume {inbox}`)" in through.stderr
    assert "WAITING" in through.stderr and "its folder is paused" in through.stderr
    assert not sidecar(inbox / "a.wav").exists() and not sidecar(inbox / "b.wav").exists()
    assert emu.api.counts().get(STREAM, 0) == 0
    assert cli("resume", str(inbox), env=env, cfg=cfg).returncode == 0
    wait_for(lambda: sidecar(inbox / "a.wav").exists() and sidecar(inbox / "b.wav").exists(), timeout=30)
    assert emu.api.counts()[STREAM] == 2
    assert d.stop() == 0


def test_a_scan_of_a_sub_folder_of_a_paused_folder_pays_nothing(tmp_path, inbox, emu):
    """`watcher scan` of a sub-folder (or `.` in it) of a paused folder, no daemon running: its files are recorded
    under the paused folder, as the daemon records them, so the pause holds: nothing is sent, the scan says so and
    exits 1 (an attack found them analysed, paid for and the scan exiting 0)."""
    for name in ("a", "b"):
        write_tone(inbox / "album" / f"{name}.wav", 0.3, freq=300.0 + ord(name))
    env, cfg = env_for(tmp_path), write_config(tmp_path, base_config(tmp_path, inbox, emu))
    assert cli("pause", str(inbox), env=env, cfg=cfg).returncode == 0
    by_path = cli("scan", str(inbox / "album"), env=env, cfg=cfg)
    from_inside = cli("scan", ".", env=env, cfg=cfg, cwd=inbox / "album")
    for scanned in (by_path, from_inside):
        assert scanned.returncode == 1, scanned.stderr
        assert f"watcher: {inbox} is paused: 2 file(s) recorded but not processed" in scanned.stderr
    assert emu.api.counts().get(STREAM, 0) == 0
    assert not sidecar(inbox / "album" / "a.wav").exists()
    assert query(tmp_path, "SELECT DISTINCT folder FROM files") == (str(inbox),)


def test_a_command_waits_for_a_daemon_between_its_lock_and_its_socket(tmp_path, inbox, emu):
    """`watcher status` while the state folder's lock is held and no socket answers (a daemon starting): it says
    it waits, and answers once the lock is let go (it failed with exit 3 at once, a flake of every poll of status
    at a daemon's start)."""
    from watcher.statelock import DAEMON, StateLock

    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu))
    assert cli("scan", str(inbox), env=env_for(tmp_path), cfg=cfg).returncode == 0  # a store, and no daemon
    scanning = StateLock(tmp_path / "state", role="`watcher scan`")  # a command on the store: no wait, it says so
    scanning.acquire()
    try:
        told = cli("status", env=env_for(tmp_path), cfg=cfg)
    finally:
        scanning.release()
    assert told.returncode == 3 and "does not answer" not in told.stderr, told.stderr
    assert f"watcher pid {os.getpid()} (`watcher scan`) is working on the store" in told.stderr
    lock = StateLock(tmp_path / "state", role=DAEMON)
    lock.acquire()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "watcher", "--config", str(cfg), "status", "--json"],
                                env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        said = proc.stderr.readline()  # the wait is told on stderr before anything else
        assert f"watcher pid {os.getpid()} (the daemon) holds {tmp_path / 'state'} but does not answer yet" in said
        assert proc.poll() is None  # still waiting
    finally:
        lock.release()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out)["daemon"] is None  # read from the store: nobody runs


def test_commands_reach_the_running_daemon(tmp_path, inbox, emu, daemons):
    """With a daemon running, scan, status, retry, pause and resume go through its socket, relative paths work, and
    the exit codes are those of the README.

    1. start `watcher run`; 2. `scan .` in the folder: 0, sidecar written by the daemon; 3. a file that is not
    audio: `scan` exits 1 and names it; 4. `status` names the daemon's pid; 5. `retry bad.wav` from the folder
    matches it; 6. pausing a folder that is not configured is refused (2); `pause .` and `resume .` work.
    """
    env = env_for(tmp_path)
    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu))
    d = daemons(tmp_path, cfg, env)
    write_tone(inbox / "a.wav", 0.3)
    ok = cli("scan", ".", env=env, cfg=cfg, cwd=inbox)
    assert ok.returncode == 0, ok.stderr
    assert sidecar(inbox / "a.wav").exists()

    (inbox / "bad.wav").write_text("not audio at all")
    bad = cli("scan", ".", env=env, cfg=cfg, cwd=inbox)
    assert bad.returncode == 1
    assert "bad.wav" in bad.stderr and "not audio" in bad.stderr

    status = cli("status", "--json", env=env, cfg=cfg)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["daemon"]["pid"] == d.proc.pid and doc["daemon"]["since"]
    assert doc["counts"]["analyze"] == {"done": 1, "failed": 1}
    human = cli("status", env=env, cfg=cfg)
    assert f"daemon: running, pid {d.proc.pid}" in human.stdout

    retry = cli("retry", "bad.wav", env=env, cfg=cfg, cwd=inbox)
    assert retry.returncode == 0 and "1 job(s)" in retry.stdout, retry.stdout + retry.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    refused = cli("pause", str(elsewhere), env=env, cfg=cfg)
    assert refused.returncode == 2 and "not a configured folder" in refused.stderr
    paused = cli("pause", ".", env=env, cfg=cfg, cwd=inbox)
    assert paused.returncode == 0, paused.stderr
    folders = {f["folder"]: f for f in json.loads(cli("status", "--json", env=env, cfg=cfg).stdout)["folders"]}
    assert set(folders) == {str(inbox)} and folders[str(inbox)]["state"] == "paused"
    assert cli("resume", ".", env=env, cfg=cfg, cwd=inbox).returncode == 0
    assert d.stop() == 0
    after = json.loads(cli("status", "--json", env=env, cfg=cfg).stdout)
    assert after["daemon"] is None
    done = [e for e in d.events("job.done") if e["pipeline"] == "analyze"]
    assert done and all("reason" not in e for e in done)  # nothing to say: no `reason=None`
    (watching,) = d.events("folder.watching")
    assert "filter" not in watching  # the default filter is not spelled out at every start


def test_second_daemon_on_same_state_exits_3(tmp_path, inbox, emu, daemons):
    """A second `watcher run` on a state folder in use cannot start: exit 3, naming the pid that holds it."""
    env = env_for(tmp_path)
    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu))
    d = daemons(tmp_path, cfg, env)
    second = cli("run", env=env, cfg=cfg)
    assert second.returncode == 3, second.stderr
    assert f"in use by watcher pid {d.proc.pid}" in second.stderr


def test_wrong_key_at_start_then_fixed_by_reload(tmp_path, inbox, emu, daemons):
    """A refused key is found before any paid call; a reload with the fixed key delivers within seconds.

    1. start with a wrong key in api_key_file; 2. a file arrives: the analysis service is paused, the log names
    the key's source, status says why; 3. fix the file, SIGHUP; 4. the sidecar is written; 0 paid requests were
    sent with the wrong key (counted at the emulator), and `retry --failed` would have matched the waiting file.
    """
    key_file = tmp_path / "essentia.key"
    key_file.write_text("wrong-key\n")
    env = env_for(tmp_path)
    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu, key_file=key_file))
    d = daemons(tmp_path, cfg, env)
    wait_for(lambda: d.events("service.key_refused"), timeout=20, what="the key check")
    (refusal,) = d.events("service.key_refused")
    assert refusal["service"] == "analysis" and str(key_file) in refusal["source"]
    write_tone(inbox / "a.wav", 0.3)
    wait_for(lambda: d.events("file.settled"), timeout=20, what="the file recorded")
    status = json.loads(cli("status", "--json", env=env, cfg=cfg).stdout)
    assert "key was refused" in status["daemon"]["paused_services"]["analysis"]
    assert "wrong-key" not in json.dumps(status)

    key_file.write_text(API_KEY + "\n")
    d.reload()
    wait_for(lambda: sidecar(inbox / "a.wav").exists(), timeout=15, what="the sidecar after the reload")
    with_wrong_key = [r for r in emu.api.requests if r.headers.get("Authorization") == "Bearer wrong-key"]
    paid_tries = [r for r in with_wrong_key if r.route == STREAM and any(r.query.get("models", [""]))]
    assert len(with_wrong_key) == 1 and paid_tries == []  # the one check, which bills nothing
    assert all(k[1].startswith("analyze:") for k in emu.paid()) and len(emu.paid()) == 3
    assert "wrong-key" not in d.log.read_text()


def test_retry_failed_takes_files_waiting_on_a_paused_service(tmp_path, inbox, emu, daemons):
    """A key refused at a paid call pauses the service; `retry --failed` makes its waiting file due again."""
    env = env_for(tmp_path)
    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu))
    d = daemons(tmp_path, cfg, env)
    wait_for(lambda: d.events("daemon.ready"), timeout=20)
    emu.analysis.faults.status_401 = 1  # the next stream is refused as if the key were revoked
    write_tone(inbox / "a.wav", 0.3)
    wait_for(lambda: d.events("service.paused"), timeout=20, what="the service paused")
    assert not sidecar(inbox / "a.wav").exists()
    retry = cli("retry", "--failed", env=env, cfg=cfg)
    assert retry.returncode == 0 and "1 job(s)" in retry.stdout, retry.stdout + retry.stderr
    wait_for(lambda: sidecar(inbox / "a.wav").exists(), timeout=15, what="the sidecar after retry --failed")


def test_reload_turning_the_archive_on_delivers_existing_files(tmp_path, inbox, emu, daemons):
    """Three files analysed with the archive off are delivered after a reload turns it on (back-fill).

    1. three files analysed; 2. the config gains [archive]; SIGHUP; 3. the log and status count a back-fill of 3;
    4. all three are delivered; the processing bill equals one upload and one mastering per file.
    """
    env = env_for(tmp_path)
    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu))
    d = daemons(tmp_path, cfg, env)
    for n in range(3):
        write_tone(inbox / f"t{n}.wav", 0.3, freq=300 + 70 * n)
    wait_for(lambda: all(sidecar(inbox / f"t{n}.wav").exists() for n in range(3)), timeout=20)
    assert all(k[1].startswith("analyze:") for k in emu.paid())

    cfg.write_text(base_config(tmp_path, inbox, emu) + archive_section(tmp_path, emu))
    d.reload()
    for n in range(3):
        wait_for(lambda n=n: (tmp_path / "out" / f"t{n}" / "manifest.json").exists(), timeout=30)
    (queued,) = d.events("backfill.queued")
    assert queued["jobs"] == 3 and "archive turned on: 3" in queued["what"]
    status = json.loads(cli("status", "--json", env=env, cfg=cfg).stdout)
    assert status["daemon"]["backfill"]["queued"] == 3
    bill = emu.paid()
    assert sum(n for (_, op), n in bill.items() if op == "upload") == 3
    assert sum(n for (_, op), n in bill.items() if op == "master") == 3


def test_costly_backfill_waits_for_yes(tmp_path, inbox, emu, daemons):
    """A back-fill priced above [control] confirm_backfill_minutes waits; `scan --dry-run` and `backfill` price
    it; `watcher backfill --yes` queues it and the files are delivered."""
    env = env_for(tmp_path)
    threshold = "[control]\nconfirm_backfill_minutes = 0\n"
    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu, extra=threshold))
    d = daemons(tmp_path, cfg, env)
    for n in range(2):
        write_tone(inbox / f"t{n}.wav", 0.5, freq=300 + 70 * n)
    wait_for(lambda: all(sidecar(inbox / f"t{n}.wav").exists() for n in range(2)), timeout=20)

    cfg.write_text(base_config(tmp_path, inbox, emu, extra=threshold) + archive_section(tmp_path, emu))
    d.reload()
    wait_for(lambda: d.events("backfill.waiting"), timeout=20, what="the back-fill to wait")
    status = json.loads(cli("status", "--json", env=env, cfg=cfg).stdout)
    assert status["daemon"]["backfill"]["waiting"] == 2
    dry = cli("scan", "--dry-run", str(inbox), env=env, cfg=cfg)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("back-fill (archive turned on: 2 file(s)")
    shown = cli("backfill", env=env, cfg=cfg)
    assert "back-fill: 2 job(s)" in shown.stdout and "price: 0.0167 audio minutes" in shown.stdout, shown.stdout
    assert not any(op == "upload" for (_, op) in emu.paid())
    yes = cli("backfill", "--yes", env=env, cfg=cfg)
    assert yes.returncode == 0 and "queued 2 job(s)" in yes.stdout, yes.stdout + yes.stderr
    for n in range(2):
        wait_for(lambda n=n: (tmp_path / "out" / f"t{n}" / "manifest.json").exists(), timeout=30)


def test_missing_folder_and_unwritable_output_are_told_before_paying(tmp_path, inbox, emu, daemons):
    """A folder that never existed is `missing` (not `unavailable`); an output folder that cannot be written pauses
    the archive before any upload."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    typo = tmp_path / "inbx"
    body = base_config(tmp_path, inbox, emu) + f'[[folders]]\npath = "{typo}"\n'
    body += archive_section(tmp_path, emu, output=blocker / "out")
    env = env_for(tmp_path)
    cfg = write_config(tmp_path, body)
    d = daemons(tmp_path, cfg, env)
    wait_for(lambda: d.events("archive.output_unwritable"), timeout=20, what="the output check")
    write_tone(inbox / "a.wav", 0.3)
    wait_for(lambda: sidecar(inbox / "a.wav").exists(), timeout=20, what="the analysis, which goes on")
    assert d.events("folder.missing") and not d.events("folder.unavailable")

    def folders() -> dict[str, str]:
        doc = json.loads(cli("status", "--json", env=env, cfg=cfg).stdout)
        return {f["folder"]: f["state"] for f in doc["folders"]}

    wait_for(lambda: folders().get(str(typo)) == "missing", timeout=20, what="status to say missing")
    status = json.loads(cli("status", "--json", env=env, cfg=cfg).stdout)
    assert "output folder cannot be written" in status["daemon"]["paused_services"]["processing"]
    assert sum(emu.api.counts()[r] for r in PAID_PROCESSING) == 0


def test_config_typos_get_a_suggestion_and_the_environment_is_named(tmp_path, inbox, emu):
    """An unknown key gets "did you mean"; a bad value from a WATCHER_ variable names the variable, not the file."""
    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu).replace("settle_seconds", "setle_seconds"))
    typo = cli("status", env=env_for(tmp_path), cfg=cfg)
    assert typo.returncode == 2
    assert "folders[0].setle_seconds: unknown key; did you mean settle_seconds?" in typo.stderr
    good = write_config(tmp_path, base_config(tmp_path, inbox, emu))
    bad_env = cli("status", env=env_for(tmp_path, WATCHER_ANALYSIS__CONCURRENCY="lots"), cfg=good)
    assert bad_env.returncode == 2
    assert "invalid configuration from the environment" in bad_env.stderr and str(good) not in bad_env.stderr
    assert "WATCHER_ANALYSIS__CONCURRENCY" in bad_env.stderr


def test_emulate_prints_a_config_and_each_request(tmp_path):
    """`watcher emulate` prints a config snippet to paste and a line per request it receives."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "watcher", "emulate", "--port", "0", "--fake-analysis"],
        env=env_for(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while "# requests as they arrive:" not in lines:
            lines.append(proc.stdout.readline().rstrip("\n"))
        (base,) = {line.split('"')[1] for line in lines if line.startswith("base_url = ")}
        assert "[analysis]" in lines and "[archive]" in lines
        import httpx

        httpx.get(base + "/status/audio/nothing-here", timeout=10)
        assert proc.stdout.readline().split(" ", 1)[1].startswith("GET /status/audio/nothing-here")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


def test_doctor_without_folders_checks_what_the_daemon_watches(tmp_path, inbox, emu, daemons):
    """A daemon given its folder on the command line: `watcher doctor` checks that folder, not an empty config."""
    env = env_for(tmp_path, ESSENTIA_API_KEY=API_KEY, WATCHER_ANALYSIS__BASE_URL=emu.url)
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "watcher", "run", str(inbox)], env=env, stdout=out, stderr=out)
    try:
        wait_for(lambda: (tmp_path / "state" / "control.sock").exists(), timeout=30)
        found = cli("doctor", env=env)
        assert f"checking the folders the running daemon (pid {proc.pid}) watches" in found.stdout
        assert f"folder {inbox}: " in found.stdout and "no folder is configured" not in found.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_watcher_web_prints_a_login_link(tmp_path, inbox, emu, daemons):
    """`watcher web` prints the page's address and a working login link; with the port taken it says so (exit 1)."""
    import socket

    import httpx

    port = free_port()
    env = env_for(tmp_path, WATCHER_WEB__ENABLED="true", WATCHER_WEB__LISTEN=f"127.0.0.1:{port}")
    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu))
    d = daemons(tmp_path, cfg, env)
    shown = cli("web", env=env, cfg=cfg)
    assert shown.returncode == 0, shown.stderr
    login = next(line.split(": ", 1)[1] for line in shown.stdout.splitlines() if line.startswith("log in: "))
    token = (tmp_path / "state" / "web-token").read_text().strip()
    assert "/login?nonce=" in login and token not in login  # a one-time link, never the token
    answer = httpx.get(login, timeout=10, follow_redirects=False)
    assert answer.status_code == 303 and "watcher_session" in answer.headers.get("set-cookie", "")
    assert httpx.get(login, timeout=10, follow_redirects=False).status_code == 401  # it logs in once
    assert d.stop() == 0

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        daemons(tmp_path, cfg, env)
        busy = cli("web", env=env, cfg=cfg)
        assert busy.returncode == 1 and "already taken" in busy.stderr, busy.stdout + busy.stderr


def test_reload_adding_a_model_asks_only_that_model_for_existing_files(tmp_path, inbox, emu, daemons):
    """A model added by a reload is asked for the files already analysed, and only that model is paid."""
    env = env_for(tmp_path)
    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu))
    d = daemons(tmp_path, cfg, env)
    for n in range(2):
        write_tone(inbox / f"t{n}.wav", 0.3, freq=300 + 70 * n)
    wait_for(lambda: all(sidecar(inbox / f"t{n}.wav").exists() for n in range(2)), timeout=20)
    before = len(emu.analysis.models_requested)

    models = '"key", "bpm_degara", "loudness-ebur128", "danceability"'
    cfg.write_text(base_config(tmp_path, inbox, emu).replace("[retry]", f"models = [{models}]\n[retry]"))
    d.reload()

    def has_it(n: int) -> bool:
        return "danceability" in json.loads(sidecar(inbox / f"t{n}.wav").read_text())["models"]

    wait_for(lambda: all(has_it(n) for n in range(2)), timeout=20, what="the new model in both sidecars")
    assert emu.analysis.models_requested[before:] == [["danceability"], ["danceability"]]
    (queued,) = d.events("backfill.queued")
    assert queued["jobs"] == 2 and "model danceability added: 2" in queued["what"]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux's setpriv to drop root's override")
def test_a_socket_we_may_not_use_is_exit_3_never_the_store(tmp_path, inbox, emu, daemons):
    """A user outside the socket's mode gets "permission denied" and exit 3; nothing is done on the store."""
    env = env_for(tmp_path)
    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu, extra="[control]\nmode = 0o000\n"))
    daemons(tmp_path, cfg, env)
    assert (tmp_path / "state" / "control.sock").stat().st_mode & 0o777 == 0
    # root without the capabilities that override file permissions: as any user outside the socket's mode
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-m", "watcher"]
    for args in (["status"], ["pause", str(inbox)], ["retry", "--failed"]):
        proc = subprocess.run([*drop, "--config", str(cfg), *args], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "permission denied" in proc.stderr and "control socket" in proc.stderr
    folders = json.loads(cli("status", "--json", env=env, cfg=cfg).stdout)["folders"]
    assert all(f["state"] != "paused" for f in folders)


def test_a_daemon_starting_while_a_command_holds_the_lock_waits_for_it(tmp_path, inbox, emu):
    """`watcher status` or `scan` takes the state folder's lock for a moment; a daemon starting just then waits for
    it (it exited 3 before, so a supervisor's start could fail because somebody looked at the status)."""
    from watcher.statelock import StateLock

    env = env_for(tmp_path)
    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu))
    command = StateLock(tmp_path / "state")
    command.acquire()
    proc = subprocess.Popen([sys.executable, "-m", "watcher", "--config", str(cfg), "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def waiting_on_the_lock() -> bool:  # the daemon has the lock file open: it is trying to take it
            with_fds = Path(f"/proc/{proc.pid}/fd")
            return any(os.readlink(fd).endswith("watcher.lock") for fd in with_fds.iterdir() if fd.is_symlink())

        wait_for(lambda: proc.poll() is not None or waiting_on_the_lock(), timeout=30, what="the daemon at the lock")
        assert proc.poll() is None and not (tmp_path / "state" / "control.sock").exists()
        command.release()
        wait_for(lambda: (tmp_path / "state" / "control.sock").exists() or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert StateLock.holder(tmp_path / "state") == f"watcher pid {proc.pid} (the daemon)"
    finally:
        command.release()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        if proc.stderr:
            proc.stderr.close()


def test_a_scan_cut_by_the_daemons_stop_says_so(tmp_path, inbox, emu, daemons):
    """`watcher scan` waits on the daemon for a stream slower than a stop's grace; SIGTERM: the daemon exits 0 and
    the scan says it was cut and what to do (it said "internal error: ProgrammingError: Cannot operate on a closed
    database", and the daemon logged a traceback)."""
    emu.analysis.faults.event_delay = 1.5  # about 7 s a stream
    env = env_for(tmp_path)
    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu))
    d = daemons(tmp_path, cfg, env)
    write_tone(inbox / "slow.wav", 0.3)
    scan = subprocess.Popen([sys.executable, "-m", "watcher", "--config", str(cfg), "scan", str(inbox)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: emu.api.counts().get(STREAM) == 1, timeout=30, what="the stream under way")
        assert d.stop() == 0
        _, err = scan.communicate(timeout=30)
    finally:
        if scan.poll() is None:
            scan.kill()
    assert scan.returncode != 0 and "internal error" not in err, err
    assert "stopped or reloaded before" in err and "run it again" in err, err
    assert not d.events("control.failed")


def test_a_scan_across_a_reload_never_ends_in_an_internal_error(tmp_path, inbox, emu, daemons):
    """`watcher scan` waits on the daemon while a SIGHUP rebuilds its graph (the store the scan reads is closed
    under it): the scan ends done or says it was cut and to run it again, never "internal error:
    ProgrammingError" (2 of 3 before), and the daemon logs no traceback."""
    emu.analysis.faults.event_delay = 0.5
    env = env_for(tmp_path)
    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu))
    d = daemons(tmp_path, cfg, env)
    for n in range(3):
        write_tone(inbox / f"r{n}.wav", 0.3, freq=300 + 50 * n)
    scan = subprocess.Popen([sys.executable, "-m", "watcher", "--config", str(cfg), "scan", str(inbox)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: emu.api.counts().get(STREAM, 0) >= 1, timeout=30, what="a stream under way")
        d.reload()
        _, err = scan.communicate(timeout=60)
    finally:
        if scan.poll() is None:
            scan.kill()
    assert "internal error" not in err, err
    assert scan.returncode == 0 or "run it again" in err, err
    wait_for(lambda: d.events("daemon.reloaded"), timeout=60, what="the reload")
    assert not d.events("control.failed")


def test_ctrl_c_on_a_scan_without_a_daemon_finishes_what_runs_and_leaves_the_rest(tmp_path, inbox, emu):
    """SIGINT (Ctrl-C) on `watcher scan` with no daemon, a stream under way and more files waiting: it says it
    stops, lets the running stream end, claims nothing new, exits 1 and leaves the rest pending (it ran on for
    the whole queue, 129 s in an attack)."""
    emu.analysis.faults.event_delay = 0.5
    for n in range(6):
        write_tone(inbox / f"c{n}.wav", 0.3, freq=300 + 40 * n)
    cfg = write_config(tmp_path, base_config(tmp_path, inbox, emu).replace("[retry]", "concurrency = 1\n[retry]"))
    env = env_for(tmp_path)
    cmd = [sys.executable, "-m", "watcher", "--config", str(cfg), "--log-format", "json", "scan", str(inbox)]
    scan = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: emu.api.counts().get(STREAM, 0) >= 1, timeout=30, what="a stream under way")
        scan.send_signal(signal.SIGINT)
        _, err = scan.communicate(timeout=30)
    finally:
        if scan.poll() is None:
            scan.kill()
    assert scan.returncode == 1, err[-2000:]
    assert '"scan.stopping"' in err and '"scan.interrupted"' in err, err[-2000:]
    streams = emu.api.counts()[STREAM]
    assert 1 <= streams < 6  # the running ones ended; nothing new was claimed
    done = [f for f in inbox.glob("*.wav") if sidecar(f).exists()]
    assert len(done) == streams  # each stream sent was answered and recorded, none cut


def test_doctor_on_an_empty_postgresql_database_says_it_is_reachable(tmp_path, inbox, pg_url):
    """A new database with no tables yet (the first daemon makes them): the store check passes and says so (it
    failed with 'relation "meta" does not exist' and told the user to check pg_hba.conf)."""
    from tests.conftest import make_settings
    from watcher.doctor import check_store

    settings = make_settings(tmp_path, inbox, "http://127.0.0.1:9")
    settings = settings.model_copy(update={"store": settings.store.model_copy(update={"url": pg_url})})
    (finding,) = check_store(settings)
    assert finding.ok and "no tables yet" in finding.detail, finding


def test_a_second_signal_on_a_scan_without_a_daemon_checkpoints_at_once(tmp_path, inbox, emu):
    """SIGTERM twice on `watcher scan` (no daemon) with bodies under way at a slow `bwlimit`: the second signal
    checkpoints at once; the cut requests are recorded as not sent (they stayed "sending", maybe paid, and the
    next run sent them again), the exit is 1 with no traceback."""
    for n in range(3):
        write_tone(inbox / f"s{n}.wav", 1.0, freq=300 + 40 * n)
    extra = "concurrency = 1\n[retry]"
    cfg = write_config(tmp_path, 'bwlimit = "8k"\n' + base_config(tmp_path, inbox, emu).replace("[retry]", extra))
    cmd = [sys.executable, "-m", "watcher", "--config", str(cfg), "--log-format", "json", "scan", str(inbox)]
    log = tmp_path / "scan.log"
    with log.open("w") as out:
        scan = subprocess.Popen(cmd, env=env_for(tmp_path), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: emu.api.counts().get(STREAM, 0) >= 1, timeout=30, what="a stream under way")
        scan.send_signal(signal.SIGTERM)
        wait_for(lambda: scan.poll() is not None or '"scan.stopping"' in log.read_text(), timeout=10,
                 what="the first signal taken")  # fmt: skip
        scan.send_signal(signal.SIGTERM)
        scan.wait(timeout=30)
    finally:
        if scan.poll() is None:
            scan.kill()
    err = log.read_text()
    assert scan.returncode == 1 and "Traceback" not in err, err[-2000:]
    assert '"scan.stopping_now"' in err
    endings = query(tmp_path, "SELECT group_concat(outcome) FROM ledger")
    assert endings is not None and "sending" not in (endings[0] or ""), endings
