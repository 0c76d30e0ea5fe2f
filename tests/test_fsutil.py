"""File-system helpers: safe names from the network, umask-following outputs, crash-safe moves."""

from __future__ import annotations

import pytest

from watcher.fsutil import safe_component


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
