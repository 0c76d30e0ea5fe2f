"""What a connection to the page may cost: a real daemon process under a low open-files limit, flooded with
idle connections, still processes files with a quiet log; slow request headers are cut off."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for, write_tone
from tests.test_cli import cli_env
from tests.webutil import Page, new_emulator, web_settings
from watcher.emulator import Emulator

pytestmark = pytest.mark.timeout(120)
SOFT, HARD = 96, 160  # the daemon may raise its soft limit to HARD, no further
IDLE = 400  # far more idle connections than either limit allows


class Lines:
    """A process's JSON log lines, read as they come (so its pipe never fills)."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        with stream:  # type: ignore[attr-defined]
            for line in stream:  # type: ignore[attr-defined]
                self.lines.append(line)

    def join(self) -> None:
        self._thread.join(10)

    def events(self, start: int = 0) -> list[dict]:
        out = []
        for line in self.lines[start:]:
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "(not json)", "line": line})
        return out


@pytest.fixture
def emu() -> Iterator[Emulator]:
    e = new_emulator()
    yield e
    e.stop()


def _low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))


@pytest.mark.serial  # 400 connections and a count of the daemon's open files: alone, not beside the suite
def test_idle_connections_cannot_starve_the_daemon_of_files(tmp_path: Path, inbox: Path, emu: Emulator) -> None:
    """Under a low open-files limit, 400 idle connections to the page leave files processed and the log quiet:
    the soft limit is raised to the hard one, the connections beyond the cap are closed at once, and the held
    ones are closed when their headers do not come."""
    cfg = tmp_path / "watcher.toml"
    cfg.write_text(
        f'[[folders]]\npath = "{inbox}"\nsettle_seconds = 0.3\n\n[web]\nlisten = "127.0.0.1:0"\ntoken = "{"t" * 40}"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "watcher", "--config", str(cfg), "--log-format", "json", "run"],
        env=cli_env(tmp_path, emu.url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_low_limit,  # the child's own limit, set before it starts
    )
    log = Lines(proc.stderr)
    held: list[socket.socket] = []
    try:
        serving = wait_for(
            lambda: next((e for e in log.events() if e.get("event") in ("web.login", "web.serving")), None),
            timeout=30,
            what="the page",
        )
        port = int(serving["url"].split("/login")[0].rsplit(":", 1)[1])
        limits_text = Path(f"/proc/{proc.pid}/limits").read_text()
        assert any(line.startswith("Max open files") and line.split()[3:5] == [str(HARD), str(HARD)]
                   for line in limits_text.splitlines()), limits_text  # fmt: skip
        before = len(log.lines)
        for _ in range(IDLE):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        names = [f"t{i}.wav" for i in range(5)]
        for i, name in enumerate(names):
            write_tone(inbox / name, 0.3, freq=300.0 + 50 * i)
        wait_for(lambda: all((inbox / f"{n}.analysis.json").exists() for n in names), timeout=60, what="sidecars")
        open_fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        assert open_fds < HARD - 40, open_fds  # the page's connections took at most their share
        during = log.events(before)
        assert not any("Too many open files" in json.dumps(e) or "out of system resource" in json.dumps(e)
                       for e in during), during  # fmt: skip
        assert not [e for e in during if e.get("log_level") in ("warning", "error")], during
        assert len(during) < 60, len(during)  # a few lines per file, none per connection
        headers = {"Authorization": f"Bearer {'t' * 40}"}
        started = time.monotonic()
        r = wait_for(
            lambda: _status(port, headers), timeout=30, what="the page once idle ones close"
        )
        assert r == 200
        print(f"\n{IDLE} idle connections: {open_fds} fds open at most {HARD}; page back after "
              f"{time.monotonic() - started:.1f} s")  # fmt: skip
    finally:
        for s in held:
            s.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
        log.join()


def _status(port: int, headers: dict[str, str]) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/status", headers=headers, timeout=2).status_code
    except httpx.HTTPError:
        return None


def test_slow_request_headers_are_cut_off(
    tmp_path: Path, inbox: Path, emu: Emulator, run_daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that opens and sends nothing, or half a request line, is closed at the header deadline; a
    request in time is answered."""
    from watcher.web import limits

    monkeypatch.setattr(limits, "HEADER_SECONDS", 0.5)
    settings = web_settings(tmp_path, inbox, emu, archive=False)
    page = Page(run_daemon(settings), settings)
    for first in (b"", b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n"):
        with socket.create_connection(("127.0.0.1", page.port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(first)
            assert sock.recv(100) == b""  # closed by the page, without an answer
            assert time.monotonic() - started < 5
    assert page.client.get("/api/status").status_code == 200
    page.close()
