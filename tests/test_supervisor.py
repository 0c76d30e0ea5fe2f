"""Running under a supervisor: sd_notify messages on a socket the test owns, SIGHUP reload, pause and resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import API_KEY, make_settings, query, wait_for, write_silent_wav, write_tone
from watcher.sdnotify import NullNotifier, SystemdNotifier, notifier_from_environ
from watcher.store import Store

pytestmark = pytest.mark.timeout(60)


def start_watcher(
    tmp_path: Path, cfg: Path, url: str, *, log: Path | None = None, **env_extra: str
) -> subprocess.Popen[str]:
    """`watcher run` with JSON logs, its output piped (or, with ``log``, written to that file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env.update(
        WATCHER_STATE_DIR=str(tmp_path / "state"), WATCHER_ANALYSIS__BASE_URL=url, ESSENTIA_API_KEY=API_KEY, **env_extra
    )
    args = [sys.executable, "-m", "watcher", "--config", str(cfg), "--log-format", "json", "run"]
    if log is None:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with log.open("w") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


@contextlib.contextmanager
def ended_by_sigterm(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """The daemon for a test's body, then a SIGTERM that must end it with 0 (killed if the body failed)."""
    try:
        yield proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def folder_config(*folders: Path) -> str:
    return "".join(f'[[folders]]\npath = "{f}"\nsettle_seconds = 0.2\n' for f in folders)


def test_notify_socket_receives_the_lifecycle(tmp_path, inbox, emulator):
    """Under Type=notify: READY=1 after the first scan, STATUS with counts, WATCHDOG=1, then STOPPING on SIGTERM."""
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(20)
    cfg = tmp_path / "w.toml"
    cfg.write_text(folder_config(inbox))
    proc = start_watcher(tmp_path, cfg, emulator.url, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="2000000")
    messages: list[str] = []
    try:
        while not all(any(m.startswith(k) for m in messages) for k in ("READY=1", "WATCHDOG=1", "STATUS=")):
            messages.append(sock.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        while not all(any(m.startswith(k) for m in messages) for k in ("STOPPING=1", "EXTEND_TIMEOUT_USEC=")):
            messages.append(sock.recv(4096).decode())
        proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    assert proc.returncode == 0
    status = next(m for m in messages if m.startswith("STATUS="))
    assert "queued" in status and "failed" in status
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages)


def test_sighup_reloads_config_without_losing_work(tmp_path, emulator):
    """SIGHUP with a new folder in the config: the new folder is watched, the process keeps running."""
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    cfg = tmp_path / "w.toml"
    cfg.write_text(folder_config(first))
    proc = start_watcher(tmp_path, cfg, emulator.url)
    try:
        write_tone(first / "a.wav", 0.2)
        wait_for(lambda: (first / "a.wav.analysis.json").exists(), timeout=30)
        write_tone(second / "b.wav", 0.2, freq=500)
        cfg.write_text(folder_config(first, second))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: (second / "b.wav.analysis.json").exists(), timeout=30, what="new folder watched")
        cfg.write_text("[analysis]\nmodles = 1\n")  # a broken config: reload fails, the daemon carries on
        proc.send_signal(signal.SIGHUP)
        write_tone(first / "c.wav", 0.2, freq=700)
        wait_for(lambda: (first / "c.wav.analysis.json").exists(), timeout=30, what="old settings still in force")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert '"daemon.reloaded"' in err and '"daemon.reload_failed"' in err and "analysis.modles" in err
    assert emulator.api.counts()["POST /v1/analysis/stream"] == 3


def test_pause_survives_a_restart(tmp_path, inbox, emulator, run_daemon):
    """A paused folder's files are recorded but not processed, across a restart, until resumed."""
    settings = make_settings(tmp_path, inbox, emulator.url)
    store = Store(tmp_path / "state" / "watcher.db")
    store.set_paused(str(inbox), paused=True)
    store.close()
    d = run_daemon(settings)
    write_tone(inbox / "held.wav", 0.2)
    store = Store(tmp_path / "state" / "watcher.db")
    try:
        wait_for(lambda: store.counts().get("analyze", {}).get("pending") == 1, what="file recorded")
        d.stop()
        d = run_daemon(settings)
        assert store.counts()["analyze"] == {"pending": 1}
        assert emulator.api.counts()["POST /v1/analysis/stream"] == 0
        store.set_paused(str(inbox), paused=False)
        wait_for(lambda: (inbox / "held.wav.analysis.json").exists(), what="processed after resume")
        d.stop()
    finally:
        store.close()


def test_pause_and_resume_commands(tmp_path, inbox, emulator):
    """`watcher pause` and `resume` keep the state in the store, and status shows it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env.update(WATCHER_STATE_DIR=str(tmp_path / "state"), ESSENTIA_API_KEY=API_KEY)
    cfg = tmp_path / "watcher.toml"
    cfg.write_text(f'[[folders]]\npath = "{inbox}"\n')

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "watcher", "--config", str(cfg), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    assert run("pause", str(inbox)).returncode == 0
    assert f"{inbox}: paused" in run("status").stdout
    assert run("resume", str(inbox)).returncode == 0
    assert f"{inbox}: active" in run("status").stdout


def test_notifier_from_environ_picks_the_null_object():
    """Without NOTIFY_SOCKET nothing is sent; with it, abstract and path sockets are understood."""
    assert isinstance(notifier_from_environ({}), NullNotifier)
    n = notifier_from_environ({"NOTIFY_SOCKET": "@watcher-test", "WATCHDOG_USEC": "10000000"})
    assert isinstance(n, SystemdNotifier) and n.watchdog_interval == 5.0 and n.address == "\0watcher-test"
    n.close()


def test_status_shows_how_each_folder_is_watched(tmp_path, inbox, emulator, run_daemon):
    """The daemon records each folder's watch mode and reason; a dead observer shows up as polling."""
    from watcher.status import collect, render

    d = run_daemon(make_settings(tmp_path, inbox, emulator.url), heartbeat=0.1)

    def folder_mode() -> str | None:
        row = query(tmp_path, "SELECT mode || ': ' || reason FROM folder_state WHERE path=?", str(inbox))
        return row[0] if row else None

    wait_for(lambda: (folder_mode() or "").startswith("native: native events"), what="native mode recorded")
    detector = d.daemon.app.detector
    d.loop.call_soon_threadsafe(detector.folders[str(inbox)].watch.observer.stop)
    wait_for(
        lambda: (folder_mode() or "").startswith("polling: the native observer died"),
        timeout=30,
        what="fallback recorded",
    )
    d.stop()
    store = Store(tmp_path / "state" / "watcher.db")
    try:
        text = render(collect(store, state_dir="s", configured=[str(inbox)]))
    finally:
        store.close()
    assert f"{inbox}: active (polling: the native observer died; polling instead)" in text


def test_an_idle_heartbeat_neither_counts_the_queue_nor_rewrites_folder_health(
    tmp_path, inbox, emulator, run_daemon, monkeypatch
):
    """Between changes the heartbeat only pings: the queue is counted again after a file settled or a job ran,
    and a folder's health is written when it changed (idle CPU stays flat however many jobs the store holds)."""
    from watcher.store.sqlite.control import ControlMixin
    from watcher.store.sqlite.listing import ListingMixin

    calls = {"beats": 0, "counts": 0, "health": 0}

    def tally(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(NullNotifier, "watchdog", tally("beats", NullNotifier.watchdog))
    monkeypatch.setattr(ListingMixin, "open_counts", tally("counts", ListingMixin.open_counts))
    monkeypatch.setattr(ControlMixin, "set_folder_health", tally("health", ControlMixin.set_folder_health))
    d = run_daemon(make_settings(tmp_path, inbox, emulator.url), heartbeat=0.02)
    write_tone(inbox / "a.wav", 0.3)
    wait_for(lambda: (inbox / "a.wav.analysis.json").exists(), what="the sidecar")
    wait_for(lambda: calls["counts"] >= 1 and calls["health"] >= 1, what="a first count and health")
    settled = dict(calls)
    wait_for(lambda: calls["beats"] >= settled["beats"] + 50, timeout=30, what="fifty more heartbeats")
    d.stop()
    assert calls["counts"] - settled["counts"] <= 1  # at most the count after the last job's outcome
    assert calls["health"] == settled["health"]  # nothing changed: nothing written


# What a start with nothing to send must not load: the HTTP stack and its retry library (the first request loads
# them), the audio header reader (the first file), and the web page's server (only when the page is on).
LOADED_ON_FIRST_USE = ("httpx", "httpx_sse", "stamina", "tenacity", "mutagen")
WEB_STACK = ("uvicorn", "starlette", "h11", "anyio", "click")  # click: uvicorn's package imports its CLI
_PROBE = """
import json, os, signal, sys
from watcher import sdnotify

class Probe(sdnotify.NullNotifier):
    def ready(self):
        page = os.path.join(os.environ["WATCHER_STATE_DIR"], "web.json")
        seen = {"modules": sorted(sys.modules), "page": json.load(open(page)) if os.path.exists(page) else None}
        with open(sys.argv[1], "w") as out:
            json.dump(seen, out)
        os.kill(os.getpid(), signal.SIGTERM)

sdnotify.notifier_from_environ = lambda environ: Probe()
from watcher.cli import main
raise SystemExit(main(["--log-format", "json", "run", sys.argv[2]]))
"""


@pytest.mark.parametrize("web", [False, True], ids=["page off", "page on"])
@pytest.mark.parametrize("archive", [False, True], ids=["analysis", "analysis and archive"])
def test_ready_before_loading_what_only_work_needs(tmp_path, inbox, web, archive):
    """`watcher run` reaches READY without the modules only a request, a file or the page needs; with the page
    on, its server is up before READY."""
    modules = tmp_path / "modules.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env.update(
        WATCHER_STATE_DIR=str(tmp_path / "state"),
        WATCHER_ANALYSIS__BASE_URL="http://127.0.0.1:9",  # never called: nothing is pending
        ESSENTIA_API_KEY=API_KEY,
        WATCHER_WEB__ENABLED=str(web).lower(),
        WATCHER_WEB__LISTEN="127.0.0.1:0",
        WATCHER_ARCHIVE__ENABLED=str(archive).lower(),
        WATCHER_ARCHIVE__OUTPUT_DIR=str(tmp_path / "out"),
        NEURALANALOG_API_KEY="na-key-123456",
    )
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(modules), str(inbox)], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(modules.read_text())
    loaded = {name.partition(".")[0] for name in seen["modules"]}
    assert "watcher" in loaded and "watchdog" in loaded and "pydantic_settings" in loaded
    assert sorted(loaded.intersection(LOADED_ON_FIRST_USE if web else LOADED_ON_FIRST_USE + WEB_STACK)) == []
    if web:
        assert {"uvicorn", "starlette"} <= loaded
        assert seen["page"]["running"] is True


def test_a_reload_neither_cuts_nor_pays_again_for_a_running_stream(tmp_path, inbox, emulator):
    """A stream in flight (about 7 s: slower than a stop's 5 s grace) when SIGHUP comes. A broken config changes
    nothing and cuts nothing; a valid one lets the stream end, then applies the new settings. (Both used to cut it
    at 5 s and ask again: a second bill at a real service.)"""
    stream = "POST /v1/analysis/stream"
    emulator.analysis.faults.event_delay = 1.5
    second = tmp_path / "two"
    second.mkdir()
    cfg = tmp_path / "w.toml"
    cfg.write_text(folder_config(inbox))
    log = tmp_path / "daemon.log"
    with ended_by_sigterm(start_watcher(tmp_path, cfg, emulator.url, log=log)) as proc:
        write_tone(inbox / "a.wav", 0.2)
        wait_for(lambda: emulator.api.counts().get(stream) == 1, timeout=30, what="the first stream under way")
        cfg.write_text("[analysis]\nmodles = 1\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: '"daemon.reload_failed"' in log.read_text(), timeout=10, what="the broken reload refused")
        wait_for(lambda: (inbox / "a.wav.analysis.json").exists(), timeout=30, what="the first stream's sidecar")
        write_tone(inbox / "b.wav", 0.2, freq=500)
        wait_for(lambda: emulator.api.counts().get(stream) == 2, timeout=30, what="the second stream under way")
        cfg.write_text(folder_config(inbox, second))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: '"daemon.reloaded"' in log.read_text(), timeout=40, what="the valid reload applied")
        assert (inbox / "b.wav.analysis.json").exists()  # the stream ended before the rebuild, not cut by it
        write_tone(second / "c.wav", 0.2, freq=700)
        wait_for(lambda: (second / "c.wav.analysis.json").exists(), timeout=40, what="the new folder watched")
    text = log.read_text()
    assert '"job.checkpointed"' not in text and '"paid.resend"' not in text, text[-2000:]
    assert emulator.api.counts()[stream] == 3


def test_a_reload_that_lifts_the_bandwidth_limit_speeds_up_the_transfer_under_way(tmp_path, inbox, emulator):
    """`bwlimit` lifted by a reload while a 1 MB stream crawls at 16 KiB/s (a minute): the transfer under way speeds
    up at once and ends, then the reload applies; nothing is cut or sent again. (It held the reload for its 60 s
    grace, then cut the transfer and sent it again from the start.)"""
    stream = "POST /v1/analysis/stream"
    cfg = tmp_path / "w.toml"
    cfg.write_text('bwlimit = "16k"\n' + folder_config(inbox))
    log = tmp_path / "daemon.log"
    with ended_by_sigterm(start_watcher(tmp_path, cfg, emulator.url, log=log)) as proc:
        write_silent_wav(inbox / "long.wav", 1)
        wait_for(lambda: emulator.api.counts().get(stream) == 1, timeout=30, what="the stream under way")
        cfg.write_text('bwlimit = "off"\n' + folder_config(inbox))
        reloaded_at = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: '"daemon.reloaded"' in log.read_text(), timeout=30, what="the reload, once the stream ended")
        assert time.monotonic() - reloaded_at < 20, "the stream did not speed up"
        assert (inbox / "long.wav.analysis.json").exists()
    text = log.read_text()
    assert '"bandwidth.retimed"' in text
    assert '"job.checkpointed"' not in text and '"paid.resend"' not in text, text[-2000:]
    assert emulator.api.counts()[stream] == 1


def test_a_sighup_during_start_up_does_not_end_the_daemon(tmp_path, inbox, emulator):
    """`systemctl reload` right after a start: a SIGHUP that comes before the daemon's own handler (its first
    second) is ignored (it ended the process with 129); the config it reads at start is the newest anyway."""
    cfg = tmp_path / "w.toml"
    cfg.write_text(folder_config(inbox))
    proc = start_watcher(tmp_path, cfg, emulator.url)
    try:

        def ignoring_hup() -> bool:  # SigIgn (or, once the daemon's handler is in, SigCgt): bit 0 is SIGHUP
            status = Path(f"/proc/{proc.pid}/status").read_text()
            lines = status.splitlines()
            masks = [int(line.split()[1], 16) for line in lines if line.startswith(("SigIgn:", "SigCgt:"))]
            return any(mask & 1 for mask in masks)

        wait_for(lambda: proc.poll() is not None or ignoring_hup(), timeout=30, what="the early SIGHUP guard")
        proc.send_signal(signal.SIGHUP)
        write_tone(inbox / "a.wav", 0.2)
        wait_for(lambda: proc.poll() is not None or (inbox / "a.wav.analysis.json").exists(), timeout=30,
                 what="the daemon working after the early SIGHUP")  # fmt: skip
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0


def test_the_early_sighup_guard_is_the_first_line_of_watcher_that_runs() -> None:
    """`watcher run` ignores SIGHUP from the import of the package itself (before its half second of imports; an
    attack ended it with 129 at +0.05 to +0.3 s); any other command, and a library import, leaves SIGHUP alone."""
    # prints 1 when SIGHUP is ignored, 0 when it is left at its default
    probe = "import sys; sys.argv = {argv!r}; import signal, watcher; print(int(signal.getsignal(signal.SIGHUP)))"
    for argv, expected in (
        (["/usr/bin/watcher", "run"], "1"),
        (["/usr/bin/watcher", "--config", "w.toml", "run"], "1"),
        (["-m", "run"], "1"),
        (["/usr/bin/watcher", "status"], "0"),
        (["pytest", "run"], "0"),
    ):
        out = subprocess.run([sys.executable, "-c", probe.format(argv=argv)], capture_output=True, text=True)
        assert out.stdout.strip() == expected, (argv, out.stderr)


def test_a_stopped_daemon_ends_without_waiting_for_a_thread_stuck_on_a_slow_share() -> None:
    """A daemon that stopped while a thread still waits on a slow share (a read that takes a minute): the process
    ends about a second later with the daemon's exit code, saying so (asyncio.run and the interpreter waited for
    the thread without limit: a CI run's daemon outlived its 15 s after SIGTERM)."""
    program = (
        "import asyncio, threading, sys\n"
        "from watcher.cli import run_to_exit\n"
        "from watcher.log import configure_logging\n"
        "configure_logging('json', 'info')\n"
        "forever, reading = threading.Event(), threading.Event()\n"
        "def read():  # a read on a share that hangs\n"
        "    reading.set()\n"
        "    forever.wait(60)\n"
        "async def daemon():\n"
        "    asyncio.get_running_loop().run_in_executor(None, read)\n"
        "    await asyncio.to_thread(reading.wait, 10)\n"
        "    return 0\n"
        "sys.exit(run_to_exit(daemon()))\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 10
    assert "daemon.exit_without_threads" in done.stdout + done.stderr
