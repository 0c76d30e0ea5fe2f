"""File names that are not valid UTF-8: shown to people, stored and sent in headers without loss or crash."""

from __future__ import annotations

import os
import sqlite3

import pytest

from watcher.names import display, find_shown, from_db, header_value, is_text, to_db

ODD = [
    os.fsdecode(b"caf\xe9.wav"),  # Latin-1 from an old SMB share
    "new\nline.wav",
    "-leading dash.wav",
    os.fsdecode(b"\xff\xfe.wav"),
    "tab\there.wav",
    "Björk – Jóga.wav",
    "a" * 251 + ".wav",
]


@pytest.mark.parametrize("name", ODD)
def test_display_is_printable_utf8_and_one_line(name):
    """What people see encodes to UTF-8, has no control characters, and keeps the readable part."""
    shown = display(name)
    shown.encode("utf-8")
    assert not any(ord(c) < 32 or ord(c) == 0x7F for c in shown)
    assert shown.endswith(".wav")


def test_display_shows_bytes_and_escapes():
    assert display(os.fsdecode(b"caf\xe9.wav")) == "caf\\xe9.wav"
    assert display("new\nline.wav") == "new\\x0aline.wav"
    assert display("Björk.wav") == "Björk.wav"


@pytest.mark.parametrize("name", ODD)
def test_store_round_trip_through_sqlite(tmp_path, name):
    """to_db/from_db give back the exact name through a real SQLite column."""
    conn = sqlite3.connect(tmp_path / "t.db")
    conn.execute("CREATE TABLE f (path)")
    conn.execute("INSERT INTO f VALUES (?)", (to_db(name),))
    (value,) = conn.execute("SELECT path FROM f").fetchone()
    conn.close()
    assert from_db(value) == name
    assert isinstance(value, str) is is_text(name)


@pytest.mark.parametrize("name", ODD)
def test_header_value_is_visible_ascii(name):
    """A header value never holds a byte an HTTP library would refuse."""
    value = header_value(name)
    assert value.isascii() and all(32 <= ord(c) < 127 for c in value)


def test_header_value_keeps_plain_names():
    assert header_value("take 1.wav") == "take 1.wav"
    assert header_value(os.fsdecode(b"caf\xe9.wav")) == "caf%E9.wav"


@pytest.mark.parametrize("name", ODD)
def test_upload_and_stream_headers_take_any_name(name):
    """The multipart file name and the analysis stream's ``filename`` header encode for any OS name."""
    from watcher.services.analysis import _header_safe
    from watcher.services.multipart import _quote

    quoted = _quote(name)
    quoted.encode("utf-8")
    assert "\n" not in quoted and "\r" not in quoted and '"' not in quoted
    header = _header_safe(name)
    assert header.isascii() and all(32 <= ord(c) < 127 for c in header)


def test_find_shown_finds_the_name_display_showed(tmp_path):
    """A path as display() shows it leads back to the real file, folder by folder; a missing one to None."""
    folder = tmp_path / os.fsdecode(b"caf\xe9")
    folder.mkdir()
    real = folder / os.fsdecode(b"take \xff.wav")
    real.write_bytes(b"x")
    plain = tmp_path / "plain.wav"
    plain.write_bytes(b"y")
    assert find_shown(display(str(real))) == str(real)
    assert find_shown(str(plain)) == str(plain)
    assert find_shown(str(tmp_path / "caf\\xe9" / "other.wav")) is None
    assert find_shown(str(tmp_path / "missing.wav")) is None
