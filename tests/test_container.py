"""The container image, built from the Dockerfile on a local Debian base and run by a private dockerd.

Steps: make (or take from the cache) the debootstrap base and import it; build the image with ``BASE`` set to it;
run it with host networking, PUID/PGID/UMASK and an empty /config; drop a file into /data; the emulator on
loopback answers; the sidecar appears, owned by PUID; the health check turns healthy; ``docker stop`` ends it
with exit code 0 within 10 s. Skips (saying why) only where dockerd cannot start or debootstrap is missing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import API_KEY, wait_for, write_tone
from tests.dockerd import Dockerd, base_tarball, dockerd  # noqa: F401  (fixture)
from watcher.config import SidecarConfig
from watcher.emulator import Emulator
from watcher.pipelines.sidecar import sidecar_path

ROOT = Path(__file__).resolve().parent.parent
PUID, PGID = 4321, 4322


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def image(dockerd: Dockerd) -> str:  # noqa: F811
    """The project's image, built on the imported debootstrap base (the only change from a user's build)."""
    tarball = base_tarball()
    with tarball.open("rb") as fh:
        subprocess.run(["docker", "import", "-", "local/watcher-base"], stdin=fh, env=dockerd.env, check=True,
                       capture_output=True, timeout=300)  # fmt: skip
    started = time.monotonic()
    dockerd.docker("build", "--network", "host", "--build-arg", "BASE=local/watcher-base", "-t", "watcher:test",
                   str(ROOT), timeout=1200)  # fmt: skip
    size = int(dockerd.docker("image", "inspect", "-f", "{{.Size}}", "watcher:test").stdout)
    print(f"image built in {time.monotonic() - started:.1f} s, {size / 1e6:.0f} MB")
    return "watcher:test"


@pytest.fixture
def emu() -> Iterator[Emulator]:
    e = Emulator(analysis_key=API_KEY, use_local=False).start()
    yield e
    e.stop()


def health(dockerd: Dockerd, name: str) -> str:  # noqa: F811
    return dockerd.docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()


@pytest.mark.serial
@pytest.mark.timeout(1200)
def test_container_analyses_a_dropped_file_as_puid_turns_healthy_and_stops_cleanly(
    dockerd: Dockerd,  # noqa: F811
    image: str,
    emu: Emulator,
    tmp_path: Path,
) -> None:
    """A file in the mounted folder gets its sidecar owned by PUID; healthy; `docker stop` exits 0 within 10 s."""
    data, config = tmp_path / "data", tmp_path / "config"
    data.mkdir()
    config.mkdir()
    os.chown(data, PUID, PGID)  # the folder the user shares with the container's user
    started = time.monotonic()
    # fmt: off
    dockerd.docker(
        "run", "-d", "--name", "w1", "--network", "host", "--health-interval", "1s",
        "-v", f"{data}:/data", "-v", f"{config}:/config",
        "-e", f"PUID={PUID}", "-e", f"PGID={PGID}", "-e", "UMASK=027",
        "-e", f"ESSENTIA_API_KEY={API_KEY}", "-e", f"WATCHER_ANALYSIS__BASE_URL={emu.url}",
        "-e", "WATCHER_ANALYSIS__BACKEND=remote", "-e", f"WATCHER_WEB__LISTEN=127.0.0.1:{_free_port()}",
        image,
    )
    # fmt: on
    try:
        wait_for(lambda: health(dockerd, "w1") == "healthy", timeout=60, what="the container to turn healthy")
        audio = write_tone(data / "take.wav")
        sidecar = sidecar_path(audio, data, SidecarConfig())
        wait_for(sidecar.exists, timeout=60, what="the sidecar")
        doc = json.loads(sidecar.read_text())
        assert doc["complete"] is True and set(doc["models"]) == {"key", "bpm_degara", "loudness_ebur128"}, doc
        st = sidecar.stat()
        assert (st.st_uid, st.st_gid) == (PUID, PGID)
        assert st.st_mode & 0o777 == 0o640, oct(st.st_mode)  # UMASK=027
        assert (config / "config.toml").stat().st_uid == PUID, "the starter config belongs to PUID"
        assert (config / "state" / "watcher.db").stat().st_uid == PUID
        assert emu.api.counts()["POST /v1/analysis/stream"] == 1
        assert health(dockerd, "w1") == "healthy"
        stop_started = time.monotonic()
        dockerd.docker("stop", "--time", "10", "w1", timeout=30)
        stopped_in = time.monotonic() - stop_started
        code = dockerd.docker("inspect", "-f", "{{.State.ExitCode}}", "w1").stdout.strip()
        print(f"container: first file done and stopped {time.monotonic() - started:.1f} s after start; "
              f"stop took {stopped_in:.2f} s")  # fmt: skip
        assert code == "0", dockerd.docker("logs", "w1").stderr[-3000:]
        assert stopped_in < 10
        logs = dockerd.docker("logs", "w1")
        assert API_KEY not in logs.stdout + logs.stderr
    finally:
        dockerd.docker("rm", "-f", "w1", check=False)


@pytest.mark.serial
@pytest.mark.timeout(1200)
def test_container_honours_tz(dockerd: Dockerd, image: str) -> None:  # noqa: F811
    """TZ picks the local time zone from the image's tzdata (schedules and logs in local time)."""
    proc = dockerd.docker("run", "--rm", "--network", "host", "-e", "TZ=Europe/Berlin", "--entrypoint",
                          "/opt/watcher/bin/python", image, "-c",
                          "import time; print(time.strftime('%Z', time.localtime(0)))")  # fmt: skip
    assert proc.stdout.strip() == "CET"


@pytest.mark.serial
@pytest.mark.timeout(1200)
def test_bad_puid_is_refused_with_a_clear_message(dockerd: Dockerd, image: str, tmp_path: Path) -> None:  # noqa: F811
    """A PUID that is not a number stops the entrypoint with exit 2, naming the variable."""
    proc = dockerd.docker("run", "--rm", "--network", "host", "-e", "PUID=admin", "-v", f"{tmp_path}:/config",
                          image, check=False)  # fmt: skip
    assert proc.returncode == 2 and "PUID and PGID must be numeric" in proc.stderr


def _compose(name: str) -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", ["compose.yaml", "compose.multinode.yaml"])
def test_compose_examples_mount_config_and_data_and_declare_their_secrets(name: str) -> None:
    """Each watcher service mounts /config and /data, sets PUID/PGID/TZ, and uses only declared secrets."""
    doc = _compose(name)
    nodes = {k: v for k, v in doc["services"].items() if v.get("image", "").startswith("watcher")}
    assert nodes
    configs = set()
    for svc in nodes.values():
        targets = {v.split(":")[1] for v in svc["volumes"]}
        assert {"/config", "/data"} <= targets
        configs.add(next(v.split(":")[0] for v in svc["volumes"] if v.endswith(":/config")))
        assert {"PUID", "PGID", "UMASK", "TZ"} <= set(svc["environment"])
        assert set(svc["secrets"]) <= set(doc["secrets"])
        assert [p.split(":")[1] for p in svc["ports"]] == ["8765"]
    assert len(configs) == len(nodes), "every node has its own /config (its own state folder and lock)"
    if name == "compose.multinode.yaml":
        assert len(nodes) == 3 and {n["hostname"] for n in nodes.values()} == {"node1", "node2", "node3"}
        assert all(n["environment"]["WATCHER_STORE__URL"].startswith("postgresql://") for n in nodes.values())
        assert all("pgpass" in n["secrets"] for n in nodes.values())
