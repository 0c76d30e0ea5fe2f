"""The release artefacts: the sdist and wheel build quietly, pass ``twine check``, and the wheel alone, installed
with the locked dependency versions into a clean venv, gives a working ``watcher``.

The clean venv gets the wheel with uv, constrained to ``uv export`` of uv.lock: the locked versions come from
uv's cache (no network when ./bin/test made the test venv from the same lock), else from the package index.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_tone
from watcher import __version__

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(600)


def uv() -> str:
    """The project's pinned uv (made by ./bin/test), $UV, or one on PATH."""
    found = os.environ.get("UV") or next(iter(sorted(glob.glob(str(ROOT / ".tools/uv-*/bin/uv")))), None)
    found = found or shutil.which("uv")
    if not found:
        pytest.skip("no uv: run the suite with ./bin/test, which installs the pinned one")
    return found


def clean_env() -> dict[str, str]:
    """This environment without what would change a build's or an install's output (bytecode off, a venv)."""
    drop = ("PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("WATCHER_")}
    env["PATH"] = os.pathsep.join([str(Path(uv()).parent), env.get("PATH", "")])
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The sdist and wheel as `python -m build` makes them, and everything the build printed."""
    out = tmp_path_factory.mktemp("dist")
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--installer", "uv", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"sdist and wheel built in {time.monotonic() - started:.1f} s")
    return out, proc.stdout + proc.stderr


def test_build_prints_no_warning_and_twine_check_passes(dist: tuple[Path, str]) -> None:
    """`python -m build` says nothing about deprecations or anything else, and `twine check --strict` passes."""
    out, log = dist
    noise = [line for line in log.splitlines() if re.search(r"warn|deprecat", line, re.IGNORECASE)]
    assert noise == [], "\n".join(noise[:20])
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"watcher_audio-{__version__}-py3-none-any.whl", f"watcher_audio-{__version__}.tar.gz"]
    proc = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, out.iterdir())],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASSED") == 2


def test_wheel_installs_into_a_clean_venv_and_runs(dist: tuple[Path, str], tmp_path: Path) -> None:
    """The wheel and its locked dependencies in a fresh venv: `watcher --version`, then a dry run over a folder."""
    out, _ = dist
    env = clean_env()
    started = time.monotonic()
    constraints = tmp_path / "constraints.txt"
    command = [uv(), "export", "--locked", "--no-emit-project", "--no-hashes", "--no-header", "--output-file",
               str(constraints)]  # fmt: skip
    export = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert export.returncode == 0, export.stderr
    venv = tmp_path / "venv"
    subprocess.run([uv(), "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, env=env, timeout=60)
    wheel = next(out.glob("*.whl"))
    install = [uv(), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), "-c", str(constraints),
               str(wheel)]  # fmt: skip
    proc = subprocess.run([*install, "--offline"], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:  # something locked is not in uv's cache: fetch it from the index
        proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    watcher = venv / "bin" / "watcher"
    version = subprocess.run([str(watcher), "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert version.stdout.strip() == f"watcher {__version__}", version.stdout + version.stderr

    folder = tmp_path / "inbox"
    folder.mkdir()
    write_tone(folder / "take.wav", seconds=2.0)
    # A key (the dry run sends nothing) so that the remote backend is chosen: the wheel has no local extra.
    env.update(WATCHER_STATE_DIR=str(tmp_path / "state"), HOME=str(tmp_path / "home"), ESSENTIA_API_KEY="unused")
    dry = subprocess.run([str(watcher), "scan", "--dry-run", str(folder)], capture_output=True, text=True, env=env,
                         timeout=60, cwd=tmp_path)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert "take.wav" in dry.stdout, dry.stdout
    assert not (folder / "take.analysis.json").exists() and sorted(p.name for p in folder.iterdir()) == ["take.wav"]
    print(f"wheel installed into a clean venv and run in {time.monotonic() - started:.1f} s")
