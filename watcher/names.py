"""File names as the OS gives them: any bytes but NUL and ``/``, not always valid UTF-8.

Paths travel through watcher as ``str`` with undecodable bytes as surrogate escapes (PEP 383, what
``os.fsdecode`` gives). Three edges need care, and each has one function here:

- people (logs, status, sidecars, the web page): :func:`display` gives printable, valid UTF-8 text;
- the store: :func:`to_db` / :func:`from_db` keep the exact bytes (a valid name is stored as text, any
  other one as a BLOB of its bytes), so a name always round-trips;
- HTTP headers: :func:`header_value` percent-encodes the bytes of a name that is not plain ASCII.
"""

from __future__ import annotations

import os
from urllib.parse import quote

_CONTROL = {c: f"\\x{c:02x}" for c in range(32)} | {0x7F: "\\x7f"}


def is_text(path: str) -> bool:
    """True when ``path`` is valid Unicode text (no surrogate escapes): it encodes to UTF-8 as it is."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def display(path: str | os.PathLike[str]) -> str:
    """``path`` for people: undecodable bytes as ``\\xNN``, control characters (a newline) escaped too."""
    if isinstance(path, str) and path.isprintable():  # the common case, shown as it is (no surrogate is printable)
        return path
    raw = os.fsencode(path)
    text = raw.decode("utf-8", "backslashreplace")
    if any(ord(c) < 32 or ord(c) == 0x7F for c in text):
        text = text.translate(_CONTROL)
    return text


def text(value: str | None) -> str | None:
    """A message that may quote a name, as valid UTF-8 text (undecodable bytes as ``\\xNN``): what the store
    keeps as an error or a reason, so no name can make a write fail."""
    if value is None or is_text(value):
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def to_db(path: str) -> str | bytes:
    """What the store keeps for ``path``: the text itself, or its exact bytes when it is not valid UTF-8."""
    return path if is_text(path) else os.fsencode(path)


def from_db(value: str | bytes) -> str:
    """The path :func:`to_db` stored."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def header_value(name: str) -> str:
    """A file name as an HTTP header value: ASCII as it is, anything else percent-encoded from its bytes."""
    raw = os.fsencode(name)
    if raw.isascii() and all(32 <= b < 127 for b in raw):
        return name
    return quote(raw, safe="")


def find_shown(shown: str) -> str | None:
    """The existing path that :func:`display` shows as ``shown``: ``shown`` itself when it exists, else the
    path found name by name in each folder (a name with undecodable bytes, as the page shows it); None if
    none. Only a path whose display has an escape is looked for in its folders."""
    if os.path.lexists(shown):
        return shown
    if "\\x" not in shown:
        return None
    current = os.sep if shown.startswith(os.sep) else ""
    for part in shown.split(os.sep):
        if not part:
            continue
        candidate = os.path.join(current, part)
        if not os.path.lexists(candidate):
            try:
                entries = os.listdir(current or ".")
            except OSError:
                return None
            match = next((e for e in entries if display(e) == part), None)
            if match is None:
                return None
            candidate = os.path.join(current, match)
        current = candidate
    return current
