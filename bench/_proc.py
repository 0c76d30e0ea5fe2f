"""What the start and idle benchmarks share: a folder of files recorded as done in the store, a `watcher run`
process started with a systemd notify socket (its READY=1 is the daemon's own readiness signal), and its CPU
time read from /proc.

``--tree`` runs another checkout's watcher (for a before/after comparison): the store is populated and the
daemon started from that tree.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def use_tree(tree: Path) -> None:
    """Import watcher from ``tree`` in this process (for populating its store)."""
    sys.path.insert(0, str(tree))


def make_files(root: Path, count: int, per_dir: int = 100) -> list[Path]:
    """``count`` small .wav files, ``per_dir`` to a folder, two levels deep."""
    paths = []
    for i in range(count):
        d = root / f"d{i // (per_dir * 100):03d}" / f"e{(i // per_dir) % 100:03d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        p = d / f"f{i:06d}.wav"
        p.write_bytes(b"RIFF" + i.to_bytes(8, "little"))
        paths.append(p)
    return paths


def record_done(state_dir: Path, folder: Path, paths: list[Path]) -> None:
    """Record every file as a revision whose analyze job is done, through the store's API."""
    from watcher.store import Store

    store = Store(state_dir / "watcher.db")
    store._db.execute("PRAGMA synchronous=OFF")  # only to build the bench's store quickly; the daemon reopens it
    try:
        for p in paths:
            st = p.stat()
            store.register_revision(
                folder=str(folder),
                path=str(p),
                rel_path=os.path.relpath(p, folder),
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                inode=st.st_ino,
                jobs=[("analyze", "analyze")],
            )
            job = store.claim("analyze", "bench", now=time.time() + 1)
            assert job is not None
            store.release(job, state="done")
    finally:
        store.close()


def env_for(
    tree: Path, state_dir: Path, folder: Path, *, poll: bool = False, interval: float = 10.0, web: bool = False
) -> dict[str, str]:
    """Settings through the environment: remote analysis that is never called (nothing is pending), no archive."""
    env = dict(os.environ)
    # As installed: a wheel's modules are compiled once. PYTHONDONTWRITEBYTECODE (set in some shells and
    # containers) would make every start compile the checkout's sources again; the bytecode goes to a cache
    # beside the state folder instead (the first, uncounted run fills it), never into the tree.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(state_dir.parent / "pycache")
    env.update(
        PYTHONPATH=str(tree),
        WATCHER_STATE_DIR=str(state_dir),
        WATCHER_LOG_LEVEL="warning",
        WATCHER_ANALYSIS__API_KEY="bench-key",
        WATCHER_ANALYSIS__BASE_URL="http://127.0.0.1:9",
        WATCHER_ARCHIVE__ENABLED="false",
        WATCHER_WEB__ENABLED="true" if web else "false",
        WATCHER_WEB__LISTEN="127.0.0.1:0",
        WATCHER_METRICS__ENABLED="false",
    )
    if poll:  # a folder's options come from a config file (the command line's folders take only their paths)
        config = state_dir.parent / f"{state_dir.name}.toml"
        config.write_text(f'[[folders]]\npath = "{folder}"\npoll = true\npoll_interval = {interval}\n')
        env["WATCHER_CONFIG"] = str(config)
    return env


class Daemon:
    """`python -m watcher run FOLDER` under a notify socket; ``spawned`` is the perf_counter at spawn."""

    def __init__(self, tree: Path, folder: Path, env: dict[str, str], sock_dir: Path) -> None:
        self.sock_path = sock_dir / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        env = dict(env, NOTIFY_SOCKET=str(self.sock_path))
        args = [sys.executable, "-m", "watcher", "run"]
        if "WATCHER_CONFIG" not in env:
            args.append(str(folder))
        self.spawned = time.perf_counter()
        self.proc = subprocess.Popen(args, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from spawn to READY=1."""
        self.sock.settimeout(timeout)
        while True:
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                raise SystemExit(f"no READY within {timeout} s: {self.stop()}") from None
            if "READY=1" in msg.split("\n"):
                ready = time.perf_counter() - self.spawned
                threading.Thread(target=self._drain, daemon=True).start()
                return ready

    def _drain(self) -> None:
        """Keep reading the notify socket (watchdog pings, status lines), so the daemon's sends never fail."""
        self.sock.settimeout(None)
        with contextlib.suppress(OSError):
            while self.sock.recv(4096):
                pass

    def cpu(self) -> float:
        """The daemon's CPU seconds so far (utime + stime of all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def wait_quiet(self, window: float = 0.3, step: float = 0.01, timeout: float = 120.0) -> float:
        """Seconds from spawn to the last CPU tick before ``window`` seconds without one (the daemon went idle)."""
        last, last_at = self.cpu(), time.perf_counter()
        deadline = last_at + timeout
        while time.perf_counter() - last_at < window:
            if time.perf_counter() > deadline:
                raise SystemExit("the daemon never went quiet")
            time.sleep(step)
            now = self.cpu()
            if now != last:
                last, last_at = now, time.perf_counter()
        return last_at - self.spawned

    def stop(self) -> str:
        """SIGTERM, wait, and return what it wrote to stderr (warnings and errors)."""
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self.sock.close()
        return err.decode(errors="replace")


def find_pass(folder: Path) -> tuple[float, float]:
    """One `find -printf` over the tree, as the reference: (wall seconds, CPU seconds of the find process)."""
    before = os.times()
    start = time.perf_counter()
    subprocess.run(["find", str(folder), "-printf", r"%s %T@ %i\n"], stdout=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - start
    after = os.times()
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def python_spawn() -> float:
    """Seconds for `python -c pass`."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


@contextlib.contextmanager
def running(tree: Path, folder: Path, env: dict[str, str], sock_dir: Path) -> Iterator[Daemon]:
    daemon = Daemon(tree, folder, env, sock_dir)
    try:
        yield daemon
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
