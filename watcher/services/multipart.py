"""multipart/form-data both ways, streamed: a body for uploads, and a chunk-fed parser for the emulator.

Both sides live together so they agree on the format. Neither ever holds a file part in memory: the body
yields the file's chunks as they are read from disk, and the parser writes file parts to a sink as bytes
arrive, keeping back only enough to recognise a boundary split across two chunks.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import IO

from watcher.errors import FileChanged
from watcher.services.http import AudioSource

MAX_HEADER_BYTES = 16 << 10
MAX_FIELD_BYTES = 1 << 20


def _quote(value: str) -> str:
    """A header parameter value as browsers and httpx write it: UTF-8, with ``"`` and CR/LF escaped.

    A name that is not valid UTF-8 (surrogate escapes from ``os.fsdecode``) is sent percent-encoded from
    its exact bytes, so building the body never raises on it.
    """
    from watcher.names import header_value, is_text

    if not is_text(value):
        return header_value(value)
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


class MultipartBody:
    """A multipart/form-data request body: small text fields first, then one file part streamed from disk.

    ``length`` is exact, so the request carries Content-Length (no chunked coding). Iterating it again
    starts over with a fresh read of the file. ``complete`` turns True as the closing boundary is handed
    to the transport: until then the server cannot have received a whole request.
    """

    def __init__(
        self, file_field: str, source: AudioSource, fields: Mapping[str, str] | None = None, *, boundary: str = ""
    ) -> None:
        self.source = source
        self.boundary = boundary or secrets.token_hex(16)
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        head = b"".join(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quote(k)}"\r\n\r\n'.encode()
            + v.encode()
            + b"\r\n"
            for k, v in (fields or {}).items()
        )
        self._head = (
            head
            + (
                f"--{self.boundary}\r\nContent-Disposition: form-data; "
                f'name="{_quote(file_field)}"; filename="{_quote(source.name)}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
        )
        self._tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.length = len(self._head) + source.size + len(self._tail)
        self.sent = 0  # file bytes handed to the transport by the current iteration
        self.complete = False

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": self.content_type, "Content-Length": str(self.length)}

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.sent, self.complete = 0, False
        yield self._head
        async for chunk in self.source.chunks():
            if self.sent + len(chunk) > self.source.size:
                raise FileChanged("the file grew while it was being sent")
            self.sent += len(chunk)
            yield chunk
        if self.sent != self.source.size:
            raise FileChanged(f"the file gave {self.sent} bytes, {self.source.size} were expected")
        self.complete = True
        yield self._tail


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
