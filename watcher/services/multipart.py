"""A multipart/form-data request body, streamed: the file's chunks are yielded as they are read from disk.

The emulator's parser (watcher.emulator.multipart) reads what this writes; a round-trip test keeps the two
in agreement.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping

from watcher.errors import FileChanged
from watcher.sending import body_ending, body_started
from watcher.services.http import AudioSource


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
        ticket = body_started(self.length)  # partial until its tail: a request cut before is not sent
        yield self._head
        async for chunk in self.source.chunks():
            if self.sent + len(chunk) > self.source.size:
                raise FileChanged("the file grew while it was being sent")
            self.sent += len(chunk)
            yield chunk
        if self.sent != self.source.size:
            raise FileChanged(f"the file gave {self.sent} bytes, {self.source.size} were expected")
        self.complete = True
        body_ending(ticket)
        yield self._tail
