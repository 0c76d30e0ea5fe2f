"""File-system helpers: safe names from the network, umask-following outputs, crash-safe moves."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from watcher import fsutil
from watcher.fsutil import safe_component


@pytest.fixture
def real_umask_002(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process umask set to 002 for this test (and read back as watcher reads it), then restored."""
    old = os.umask(0o002)
    try:
        monkeypatch.setattr(fsutil, "UMASK", fsutil._read_umask())
        assert fsutil.UMASK == 0o002
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vocals", "vocals"),
        ("one (mastered).wav", "one (mastered).wav"),
        ("../../etc/passwd", "etc_passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("a/b/c.wav", "a_b_c.wav"),
        ("..", "stems-1"),
        (".", "stems-1"),
        ("", "stems-1"),
        ("   ", "stems-1"),
        (".hidden.wav", "hidden.wav"),
        ("--rf.wav", "rf.wav"),
        ("-", "stems-1"),
        ("x\x00y\x1b\n.wav", "x_y__.wav"),
        ("a..b.wav", "a.b.wav"),
        ("trailing. ", "trailing"),
        ("\udcff\udcfe", "stems-1"),
    ],
)
def test_safe_component(name: str, expected: str) -> None:
    """Whatever the network sends, the result is one plain, visible file name (or the fallback)."""
    got = safe_component(name, "stems-1")
    assert got == expected
    assert "/" not in got and "\\" not in got and ".." not in got and not got.startswith((".", "-"))


def test_safe_component_is_at_most_255_bytes_and_keeps_the_extension() -> None:
    """A long multibyte name is cut on a character boundary, extension kept."""
    got = safe_component("é" * 300 + ".wav", "x")
    assert len(got.encode("utf-8")) <= 255 and got.endswith(".wav") and got.startswith("é")
    got.encode("utf-8")  # valid UTF-8: no half character
    assert safe_component("", "") == ""
    assert safe_component("../", "../x") == "x"


# -- outputs follow the umask ---------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o002, 0o027])
def test_sidecars_follow_a_real_umask(tmp_path: Path, umask: int) -> None:
    """In a process started with that umask, a JSON output is 0o666 & ~umask; nothing else is left behind."""
    code = (
        "import sys; from pathlib import Path; from watcher import fsutil;"
        "fsutil.write_json_atomic(Path(sys.argv[1]), {'a': 1}); print(oct(fsutil.UMASK))"
    )
    target = tmp_path / "take.wav.analysis.json"
    out = subprocess.run(
        [sys.executable, "-c", code, str(target)], umask=umask, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == oct(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_publish_tree_gives_output_modes(tmp_path: Path, real_umask_002: None) -> None:
    """Private temp files and folders get the umask's modes when published."""
    root = tmp_path / "staging"
    (root / "stems").mkdir(parents=True, mode=0o700)
    (root / "stems" / "a.wav").write_bytes(b"x")
    os.chmod(root / "stems" / "a.wav", 0o600)
    fsutil.publish_tree(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o775
    assert stat.S_IMODE((root / "stems").stat().st_mode) == 0o775
    assert stat.S_IMODE((root / "stems" / "a.wav").stat().st_mode) == 0o664
