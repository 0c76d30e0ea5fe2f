"""The emulator's multipart/form-data parser: fed chunks as they arrive, it writes file parts to a sink and
never holds one in memory, keeping back only enough to recognise a boundary split across two chunks. It reads
what watcher.services.multipart.MultipartBody writes (tests/test_emulator_neuralanalog.py checks both ways).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

MAX_HEADER_BYTES = 16 << 10
MAX_FIELD_BYTES = 1 << 20


@dataclass
class Part:
    """One part as the parser saw it; file parts went to a sink, so only their size and hash are kept."""

    name: str
    filename: str | None
    size: int = 0
    sha256: str = ""


_PARAM = re.compile(r';\s*([\w*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


def _disposition(raw: bytes) -> tuple[str, str | None]:
    """The ``name`` and ``filename`` of a part from its headers; ValueError when it has none."""
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() != "content-disposition":
            continue
        params: dict[str, str] = {}
        for m in _PARAM.finditer(value):
            v = m.group(2) if m.group(2) is not None else m.group(3)
            params[m.group(1).lower()] = v.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")
        if "name" not in params:
            break
        return params["name"], params.get("filename")
    raise ValueError("a part without a Content-Disposition name")


class MultipartParser:
    """Feed a multipart/form-data body chunk by chunk; file parts go to ``open_sink(field, filename)``.

    After :meth:`close`, ``fields`` holds the text fields and ``parts`` every part in order. Raises
    ValueError on a malformed or unterminated body.
    """

    def __init__(self, boundary: str | bytes, open_sink: Callable[[str, str], IO[bytes]]) -> None:
        b = boundary.encode() if isinstance(boundary, str) else boundary
        if not b:
            raise ValueError("no multipart boundary")
        self._first = b"--" + b
        self._delim = b"\r\n--" + b
        self._open_sink = open_sink
        self._buf = bytearray()
        self._state = "preamble"
        self._part: Part | None = None
        self._sink: IO[bytes] | None = None
        self._field = bytearray()
        self._sha = hashlib.sha256()
        self.fields: dict[str, str] = {}
        self.parts: list[Part] = []

    def feed(self, data: bytes) -> None:
        self._buf += data
        while self._step():
            pass

    def abort(self) -> None:
        """Stop early (the body will not come): close the open sink, if any."""
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def close(self) -> None:
        """The body ended: anything but a finished closing boundary is an error."""
        self.abort()
        if self._state != "end":
            raise ValueError(f"the multipart body ended early (in its {self._state})")

    def _write(self, data: bytes) -> None:
        if not data:
            return
        assert self._part is not None
        self._part.size += len(data)
        if self._sink is not None:
            self._sha.update(data)
            self._sink.write(data)
        else:
            self._field += data
            if len(self._field) > MAX_FIELD_BYTES:
                raise ValueError(f"field {self._part.name!r} is too large")

    def _end_part(self) -> None:
        assert self._part is not None
        if self._sink is not None:
            self._sink.close()
            self._sink = None
            self._part.sha256 = self._sha.hexdigest()
        else:
            self.fields[self._part.name] = self._field.decode("utf-8", "replace")
        self.parts.append(self._part)
        self._part = None

    def _step(self) -> bool:
        """Advance the state machine once; False when more input is needed."""
        buf = self._buf
        if self._state == "preamble":
            i = buf.find(self._first)
            if i < 0:
                del buf[: max(0, len(buf) - len(self._first))]
                return False
            del buf[: i + len(self._first)]
            self._state = "boundary line"
            return True
        if self._state == "boundary line":
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self._state = "end"
                return False
            if buf[:2] != b"\r\n":
                raise ValueError("malformed boundary line")
            del buf[:2]
            self._state = "part headers"
            return True
        if self._state == "part headers":
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise ValueError("part headers too long")
                return False
            name, filename = _disposition(bytes(buf[:i]))
            del buf[: i + 4]
            self._part = Part(name, filename)
            self._field = bytearray()
            self._sha = hashlib.sha256()
            self._sink = self._open_sink(name, filename) if filename is not None else None
            self._state = "part body"
            return True
        if self._state == "part body":
            i = buf.find(self._delim)
            if i < 0:
                keep = len(self._delim) - 1
                if len(buf) > keep:
                    self._write(bytes(buf[:-keep]))
                    del buf[:-keep]
                return False
            self._write(bytes(buf[:i]))
            del buf[: i + len(self._delim)]
            self._end_part()
            self._state = "boundary line"
            return True
        return False  # end: the epilogue is ignored
