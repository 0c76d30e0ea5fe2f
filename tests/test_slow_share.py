"""A share that answers slowly must not stall the daemon: a real FUSE filesystem whose every stat takes 1 s,
watched (polled) by a real `watcher run` process, whose systemd watchdog pings must keep their pace.

Run as a script, this file is that filesystem: ``python tests/test_slow_share.py BACKING MOUNTPOINT DELAY``
mounts a passthrough of BACKING on MOUNTPOINT (mfusepy over libfuse 2) where ``getattr`` sleeps DELAY s.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from watcher.looplag import LoopLag

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).resolve()
DELAY = 1.0
WATCHDOG_USEC = 2_000_000  # systemd's WatchdogSec=2: watcher pings every 1 s


def test_loop_lag_measures_a_blocked_loop():
    """A 0.6 s blocking call on the loop shows as a lag of about 0.6 s; an idle loop shows almost none."""
    seen: list[float] = []

    async def main() -> LoopLag:
        lag = LoopLag(0.1, on_sample=seen.append).start()
        await asyncio.sleep(0.35)  # sleep-ok: a few idle samples
        idle = lag.max
        time.sleep(0.6)  # noqa: ASYNC251  # sleep-ok: the blocking call on the loop being measured
        await asyncio.sleep(0.25)  # sleep-ok: let the late sample land
        await lag.stop()
        assert idle < 0.1, idle
        return lag

    lag = asyncio.run(main())
    assert 0.5 <= lag.max < 1.0, lag.max
    assert lag.samples == len(seen) >= 4
    worst = lag.reset_max()
    assert worst >= 0.5 and lag.max == lag.current


# -- the slow filesystem ---------------------------------------------------------------------------------------


def serve(backing: str, mountpoint: str, delay: float) -> None:
    """Mount a passthrough of ``backing`` on ``mountpoint`` whose getattr takes ``delay`` seconds (blocks)."""
    import mfusepy as fuse

    def real(path: str) -> str:
        return os.path.join(backing, path.lstrip("/"))

    def guarded(fn: Any) -> Any:
        def call(*args: Any) -> Any:
            try:
                return fn(*args)
            except OSError as exc:
                raise fuse.FuseOSError(exc.errno or errno.EIO) from exc

        return call

    class SlowPassthrough(fuse.Operations):
        use_ns = True

        @guarded
        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            time.sleep(delay)  # sleep-ok: the slow share under test
            st = os.lstat(real(path))
            keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino")
            attrs: dict[str, Any] = {k: getattr(st, k) for k in keys}
            attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
            return attrs

        @guarded
        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(real(path))]

        @guarded
        def open(self, path: str, flags: int) -> int:
            return os.open(real(path), flags)

        @guarded
        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return os.open(real(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

        @guarded
        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return os.pread(fh, size, offset)

        @guarded
        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            return os.pwrite(fh, data, offset)

        @guarded
        def truncate(self, path: str, length: int, fh: int | None = None) -> None:
            os.truncate(real(path), length)

        @guarded
        def flush(self, path: str, fh: int) -> None:
            return None

        @guarded
        def fsync(self, path: str, datasync: int, fh: int) -> None:
            os.fsync(fh)

        @guarded
        def release(self, path: str, fh: int) -> None:
            os.close(fh)

        @guarded
        def rename(self, old: str, new: str) -> None:
            os.rename(real(old), real(new))

        @guarded
        def unlink(self, path: str) -> None:
            os.unlink(real(path))

        @guarded
        def mkdir(self, path: str, mode: int) -> None:
            os.mkdir(real(path), mode)

        @guarded
        def rmdir(self, path: str) -> None:
            os.rmdir(real(path))

        @guarded
        def chmod(self, path: str, mode: int) -> None:
            os.chmod(real(path), mode)

        @guarded
        def chown(self, path: str, uid: int, gid: int) -> None:
            os.chown(real(path), uid, gid)

        @guarded
        def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
            os.utime(real(path), ns=times)

        @guarded
        def statfs(self, path: str) -> dict[str, Any]:
            sv = os.statvfs(real(path))
            keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_frsize")
            return {k: getattr(sv, k) for k in keys} | {"f_namemax": sv.f_namemax}

    fuse.FUSE(SlowPassthrough(), mountpoint, foreground=True, nothreads=False, fsname="slowshare")


def mount_slow_share(backing: Path, mountpoint: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start the slow filesystem; skip the test with the reason when FUSE cannot be mounted here."""
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: the package is there but libfuse is not
        pytest.skip(f"FUSE is not usable from Python here ({exc}); install libfuse2 (Debian: libfuse2)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine: a FUSE share cannot be mounted")
    mountpoint.mkdir()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(HERE), str(backing), str(mountpoint), str(DELAY)], stdout=out, stderr=out
        )
    deadline = time.monotonic() + 20
    while not _mounted(mountpoint):
        if proc.poll() is not None:
            why = log.read_text(errors="replace").strip()[-300:]
            pytest.skip(f"the FUSE share could not be mounted (exit {proc.returncode}): {why}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.skip("the FUSE share did not come up within 20 s")
        time.sleep(0.1)  # sleep-ok: polling for the mount, bounded by the deadline
    return proc


def _mounted(path: Path) -> bool:
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        return any(line.split()[1] == str(path) for line in fh)


def unmount(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """Stop the filesystem process (libfuse unmounts on SIGTERM); lazily unmount what is left."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    if _mounted(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


@pytest.mark.serial  # it measures the gaps between watchdog pings: a loaded machine would blur them
def test_watchdog_pings_keep_pace_while_a_slow_share_is_scanned_and_polled(tmp_path, emulator):
    """Every stat on the share takes 1 s; the daemon still pings systemd's watchdog every ~1 s (gaps < 1.5 s)."""
    from tests.conftest import API_KEY, write_tone

    backing = tmp_path / "backing"
    for i in range(3):
        write_tone(backing / f"take {i}.wav", 0.2, freq=300 + 40 * i)
    write_tone(backing / "sub" / "deeper.wav", 0.2, freq=700)
    share = tmp_path / "share"
    fs = mount_slow_share(backing, share, tmp_path / "fuse.log")
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(1.0)
    cfg = tmp_path / "w.toml"
    cfg.write_text(
        f'[[folders]]\npath = "{share}"\npoll = true\npoll_interval = 1\nsettle_seconds = 0.5\nrescan_interval = 5\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env.update(
        WATCHER_STATE_DIR=str(tmp_path / "state"),
        WATCHER_ANALYSIS__BASE_URL=emulator.url,
        ESSENTIA_API_KEY=API_KEY,
        NOTIFY_SOCKET=str(sock_path),
        WATCHDOG_USEC=str(WATCHDOG_USEC),
    )
    log_path = tmp_path / "watcher.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", "--config", str(cfg), "--log-format", "json", "run"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    pings: list[float] = []
    started = time.monotonic()
    try:
        new_file_at = started + 8
        while time.monotonic() - started < 25:
            if new_file_at and time.monotonic() >= new_file_at:
                write_tone(backing / "arrived later.wav", 0.2, freq=900)  # found by polling the slow share
                new_file_at = 0.0
            try:
                msg = sock.recv(4096).decode()
            except TimeoutError:
                assert proc.poll() is None, f"watcher exited with {proc.returncode}"
                continue
            for line in msg.splitlines():
                if line == "WATCHDOG=1":
                    pings.append(time.monotonic())
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        sock.close()
        unmount(fs, share)
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    names = {e.get("event") for e in events}
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    interval = WATCHDOG_USEC / 2e6
    lag = [max(0.0, g - interval) for g in gaps]
    print(
        f"watchdog pings: {len(pings)}, interval {interval:.2f} s, largest gap {max(gaps, default=0):.2f} s; "
        f"loop lag measured from the gaps: max {max(lag, default=0):.2f} s, mean {sum(lag) / max(len(lag), 1):.3f} s"
    )
    late = any(e.get("event") == "file.settled" and "arrived later" in e.get("path", "") for e in events)
    print(f"files settled: {sum(e.get('event') == 'file.settled' for e in events)}; the later file seen: {late}")
    stalls = [e for e in events if e.get("event") == "loop.stalled"]
    if stalls:
        print("the daemon's own loop-lag monitor reported:", [e.get("lag_seconds") for e in stalls])
    assert "folder.watching" in names and "scan.done" in names, sorted(n for n in names if n)
    assert len(pings) >= 15, f"only {len(pings)} watchdog pings in 25 s"
    assert max(gaps) < 1.5 * interval, f"a watchdog gap of {max(gaps):.2f} s (gaps: {[round(g, 2) for g in gaps]})"


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], float(sys.argv[3]))
