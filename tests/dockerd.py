"""A private Docker daemon and a local base image for the container tests (no image registry is needed).

The base is a Debian root file system made by ``debootstrap --variant=minbase`` with Python, its venv module,
CA certificates and tini, plus this machine's CA bundle and a pip.conf naming it (so pip and uv in the build reach
the package index the way this machine does). Its tarball is cached under ``~/.cache/watcher-tests``, keyed by
everything that goes into it, so only the first run pays for debootstrap (about a minute).

The daemon gets its own socket, data and exec folders, no bridge and no iptables rules; containers use the host's
network. When dockerd cannot start (not root, no cgroups, no overlay), the tests skip and say why; a missing
docker or debootstrap is a skip too, except in CI, where .ci/run installs both.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "ca-certificates", "tini", "tzdata")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "watcher-tests"


def _missing(reason: str) -> None:
    """A tool .ci/run installs is missing: a failure in CI (the env var CI is set), a skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources), else deb.debian.org."""
    for source in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        with contextlib.suppress(OSError):
            for line in source.read_text().splitlines():
                if line.startswith("URIs:"):
                    return line.split()[1]
                if line.startswith("deb ") and "security" not in line:
                    return next(w for w in line.split()[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def _pip_conf() -> str:
    """The base's /etc/pip.conf: this machine's CA bundle for pip, and for uv through SSL_CERT_FILE in the build."""
    return f"[global]\ncert = {CA_BUNDLE}\n"


def base_tarball() -> Path:
    """The cached root file system tarball of the base image, made with debootstrap when missing."""
    if not CA_BUNDLE.is_file():
        pytest.skip(f"no CA bundle at {CA_BUNDLE} to give the base image")
    mirror = _mirror()
    key = hashlib.sha256(
        "\n".join([SUITE, "minbase", ",".join(PACKAGES), mirror, _pip_conf()]).encode() + CA_BUNDLE.read_bytes()
    ).hexdigest()[:16]
    tarball = CACHE / f"base-{SUITE}-{key}.tar"
    if tarball.is_file():
        return tarball
    if shutil.which("debootstrap") is None:
        _missing("debootstrap is not installed (.ci/run installs it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="watcher-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(rootfs), mirror],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            pytest.skip(f"debootstrap failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-500:]}")
        shutil.copyfile(CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
        (rootfs / "etc/pip.conf").write_text(_pip_conf())
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True, timeout=300)
        partial.replace(tarball)
    return tarball


class Dockerd:
    """A running private dockerd; :meth:`docker` runs the client against it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "0"}
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Dockerd:
        if shutil.which("dockerd") is None or shutil.which("docker") is None:
            _missing("docker is not installed (.ci/run installs docker.io)")
        if os.geteuid() != 0:
            pytest.skip("dockerd needs root")
        r = self.root
        # fmt: off
        command = ["dockerd", "--host", f"unix://{self.socket}", "--data-root", str(r / "data"),
                   "--exec-root", str(r / "exec"), "--pidfile", str(r / "dockerd.pid"),
                   "--bridge=none", "--iptables=false", "--ip-masq=false"]
        # fmt: on
        with open(self.root / "dockerd.log", "wb") as log:  # the daemon keeps its own copy of the descriptor
            self._proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = (self.root / "dockerd.log").read_text(errors="replace")[-800:]
                pytest.skip(f"dockerd cannot start here (exit {self._proc.returncode}): {tail}")
            if self.socket.exists() and self.docker("version", check=False).returncode == 0:
                return self
            time.sleep(0.2)  # sleep-ok: the poll of a wait for dockerd's readiness, with its deadline above
        self.stop()
        pytest.skip("dockerd did not answer within 60 s")

    def docker(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["docker", *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None
        # Container layers are overlay mounts under data/: unmount what is left before removing the folder.
        with contextlib.suppress(OSError), open("/proc/self/mounts") as mounts:
            for line in mounts.read().splitlines():
                point = line.split()[1]
                if point.startswith(str(self.root)):
                    subprocess.run(["umount", "-l", point], capture_output=True, check=False)


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Dockerd]:
    """A private dockerd for one test module, with its folders removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="watcher-docker-"))
    daemon = Dockerd(root)
    try:
        yield daemon.start()
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
