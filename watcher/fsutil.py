"""Atomic file outputs: write a temp file in the same folder, fsync, rename over the target, fsync the folder."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".watcher-tmp-"
MAX_COMPONENT_BYTES = 255
_UNSAFE = re.compile(r"[/\\]")
_DOTS = re.compile(r"\.{2,}")


def safe_component(name: str, fallback: str) -> str:
    """``name`` (from the network) as one safe file name: never a path, never hidden, never an option.

    Separators become ``_``, control characters and undecodable bytes go, runs of dots become one dot,
    leading dots, dashes and spaces and trailing dots and spaces go, and the result is cut to 255 UTF-8
    bytes keeping its extension. An empty result gives ``fallback`` (itself made safe; it may be empty).
    """
    text = "".join("_" if unicodedata.category(c) in ("Cc", "Cs") else c for c in name)
    text = _DOTS.sub(".", _UNSAFE.sub("_", text)).lstrip(". -_\u00a0").rstrip(". ")
    if not text.strip("_"):
        return safe_component(fallback, "") if fallback else ""
    return _truncate(text, MAX_COMPONENT_BYTES)


def _truncate(name: str, limit: int) -> str:
    """``name`` cut to ``limit`` UTF-8 bytes on a character boundary, keeping a short extension."""
    if len(name.encode("utf-8")) <= limit:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot or len(suffix.encode("utf-8")) > 16 or not stem:
        stem, suffix = name, ""
    tail = f".{suffix}" if suffix else ""
    room = limit - len(tail.encode("utf-8"))
    cut = stem.encode("utf-8")[:room].decode("utf-8", "ignore")
    return cut + tail


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where folders cannot be opened, e.g. some shares)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old file or the new one, never a mix.

    On failure (a full disk) the temp file is removed and the old file is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
