"""The emulator's multipart/form-data reader: python-multipart's streaming parser (the one Starlette's forms use)
with file parts written to a sink as they arrive, never held in memory, and text fields kept within a bound.

It reads what watcher.services.multipart.MultipartBody writes (tests/test_emulator_neuralanalog.py checks both ways).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from python_multipart.multipart import MultipartParser as _Parser
from python_multipart.multipart import parse_options_header

MAX_HEADER_BYTES = 16 << 10  # all the headers of one part
MAX_FIELD_BYTES = 1 << 20  # one text field


@dataclass
class Part:
    """One part as the parser saw it; file parts went to a sink, so only their size and hash are kept."""

    name: str
    filename: str | None
    size: int = 0
    sha256: str = ""


def _unquote(raw: bytes) -> str:
    """A parameter value as browsers and MultipartBody write it: UTF-8, with ``"``, CR and LF percent-escaped."""
    return raw.decode("utf-8", "replace").replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")


class MultipartParser:
    """Feed a multipart/form-data body chunk by chunk; file parts go to ``open_sink(field, filename)``.

    After :meth:`close`, ``fields`` holds the text fields and ``parts`` every part in order. Raises
    ValueError on a malformed or unterminated body.
    """

    def __init__(self, boundary: str | bytes, open_sink: Callable[[str, str], IO[bytes]]) -> None:
        b = boundary.encode() if isinstance(boundary, str) else boundary
        if not b:
            raise ValueError("no multipart boundary")
        self._open_sink = open_sink
        self._parser = _Parser(
            b,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._data,
                "on_part_end": self._end_part,
                "on_end": self._end,
            },
        )
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._name, self._value = bytearray(), bytearray()
        self._part: Part | None = None
        self._sink: IO[bytes] | None = None
        self._field = bytearray()
        self._sha = hashlib.sha256()
        self._ended = False
        self.fields: dict[str, str] = {}
        self.parts: list[Part] = []

    def feed(self, data: bytes) -> None:
        self._parser.write(data)

    def abort(self) -> None:
        """Stop early (the body will not come): close the open sink, if any."""
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def close(self) -> None:
        """The body ended: anything but a finished closing boundary is an error."""
        self.abort()
        if not self._ended:
            part = f"in part {self._part.name!r}" if self._part is not None else "before its closing boundary"
            raise ValueError(f"the multipart body ended early ({part})")

    # -- the parser's callbacks -------------------------------------------------------------------------------

    def _begin(self) -> None:
        self._headers, self._header_bytes = {}, 0

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:
            raise ValueError("part headers too long")

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._name).strip().lower()] = bytes(self._value)
        self._name, self._value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition"))
        if b"name" not in params:
            raise ValueError("a part without a Content-Disposition name")
        name = _unquote(params[b"name"])
        filename = _unquote(params[b"filename"]) if b"filename" in params else None
        self._part = Part(name, filename)
        self._field = bytearray()
        self._sha = hashlib.sha256()
        self._sink = self._open_sink(name, filename) if filename is not None else None

    def _data(self, data: bytes, start: int, end: int) -> None:
        if end <= start:
            return
        assert self._part is not None
        chunk = data[start:end]
        self._part.size += len(chunk)
        if self._sink is not None:
            self._sha.update(chunk)
            self._sink.write(chunk)
        else:
            self._field += chunk
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

    def _end(self) -> None:
        self._ended = True
