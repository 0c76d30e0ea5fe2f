"""Audio files on disk: what a file's content says it is, its hash, and a change-checked streamed body.

Memory stays flat whatever the size: a file of ``SMALL`` bytes or less is read whole, once, for its hash and its
body; anything larger is hashed and streamed in fixed-size chunks, read in worker threads.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from watcher.errors import BadInput, FileChanged

CHUNK = 1 << 20  # read size while hashing
# Read size of a streamed body. One block is read ahead while the previous is sent. Analysis streams (up to 40
# concurrent) keep 1 MiB blocks: peak RSS stays flat (bench/memory.py). Uploads to the processing service (8
# concurrent) use 4 MiB blocks: about a fifth less client CPU per GiB, near `curl -T` (bench/upload.py), for about
# 8 MiB more per concurrent upload.
BODY_CHUNK = 1 << 20
UPLOAD_CHUNK = 1 << 22
SMALL = 1 << 20  # a file this size or smaller is read whole, once: its hash and its request body come from that read


@dataclass(frozen=True)
class Signature:
    """What identifies a revision of a file without reading it: size, mtime and inode."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> Signature:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


def signature(path: str | Path) -> Signature:
    return Signature.of(os.stat(path))


def sniff_format(head: bytes) -> str | None:
    """The audio container a file's first bytes show (wav, flac, mp3, m4a, aiff, ogg), or None."""
    if len(head) >= 12 and head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:3] == b"ID3":
        # An ID3v2 tag may precede FLAC as well as MPEG audio; the extension decides between them later.
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0 and (head[1] & 0x06) != 0:
        return "mp3"
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return "m4a"
    if len(head) >= 12 and head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:4] == b"OggS":
        return "ogg"
    return None


def check_audio(path: str | Path) -> str:
    """The file's audio format, or BadInput saying why it is not audio we can send."""
    with open(path, "rb") as fh:
        return audio_format(fh.read(64))


def audio_format(head: bytes) -> str:
    """The audio format a file's first bytes show, or BadInput saying why it is not audio we can send."""
    if not head:
        raise BadInput("the file is empty (0 bytes)")
    fmt = sniff_format(head[:64])
    if fmt is None:
        raise BadInput(
            f"the content is not audio (starts with {head[:8].hex(' ')}; expected WAV, FLAC, MP3, M4A, AIFF or OGG)"
        )
    return fmt


def _digest(fh: BinaryIO) -> tuple[int, str]:
    """(bytes read, sha256 hex) of an open file, read to its end in fixed-size chunks into one reused buffer."""
    sha = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n := fh.readinto(view):  # type: ignore[attr-defined]  # every binary file object has readinto
        sha.update(view[:n])
        size += n
    return size, sha.hexdigest()


def sha256_of(path: str | Path) -> tuple[int, str]:
    """(size, sha256) of a file, read without touching its access time where the OS allows (blocking)."""
    noatime = getattr(os, "O_NOATIME", 0)
    try:
        fd = os.open(path, os.O_RDONLY | noatime)
    except PermissionError as exc:  # O_NOATIME is for the file's owner only
        if not noatime or exc.errno != errno.EPERM:
            raise
        fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as fh:
        return _digest(fh)


def read_settled(
    path: str | Path, expected: Signature, *, keep: int = SMALL, hashed: bool = True
) -> tuple[str, bytes | None]:
    """(sha256, content) of a settled revision, read once (blocking); the content is kept only when the file
    is ``keep`` bytes or smaller, so that its request body needs no second read. FileChanged if it moves underneath.
    ``hashed=False`` skips hashing a kept content whose hash is known already (the sha256 is then "").
    """
    try:
        with open(path, "rb") as fh:
            if Signature.of(os.fstat(fh.fileno())) != expected:
                raise FileChanged("the file changed after it settled")
            content = None
            if expected.size <= keep:
                content = fh.read()
                digest = hashlib.sha256(content).hexdigest() if hashed else ""
                if len(content) != expected.size:
                    raise FileChanged("the file changed while it was being read")
            else:
                _, digest = _digest(fh)
            if Signature.of(os.fstat(fh.fileno())) != expected:
                raise FileChanged("the file changed while it was being hashed")
    except FileNotFoundError as exc:
        raise FileChanged("the file disappeared") from exc
    return digest, content


class FileBody:
    """A file streamed as a request body, checked against its settled signature before and after.

    ``chunks()`` returns a fresh iterator each time (a retry re-reads from the start). If the file's size,
    mtime or inode differ from ``expected`` at any point, the iterator raises FileChanged. The next block is
    read in a worker thread while the current one is being sent, so disk and socket overlap; at most two
    blocks are held. Given ``content`` (the whole settled revision, read once by :func:`read_settled`), it is
    sent from memory: no second read, and nothing on disk can change what is sent.
    """

    def __init__(
        self,
        path: str | Path,
        expected: Signature,
        *,
        chunk_size: int = BODY_CHUNK,
        name: str = "",
        content: bytes | None = None,
    ) -> None:
        if content is not None and len(content) != expected.size:
            raise ValueError(f"content of {len(content)} bytes for a revision of {expected.size} bytes")
        self.path = Path(path)
        self.name = name or self.path.name
        self.size = expected.size
        self.expected = expected
        self.chunk_size = chunk_size
        self.content = content
        self.bytes_sent = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.content is not None:
            for start in range(0, self.size, self.chunk_size):
                chunk = self.content[start : start + self.chunk_size] if self.size > self.chunk_size else self.content
                self.bytes_sent += len(chunk)
                yield chunk
            return
        loop = asyncio.get_running_loop()
        try:
            fh = await asyncio.to_thread(self._open)
        except FileNotFoundError as exc:
            raise FileChanged("the file disappeared before it was sent") from exc
        reading: asyncio.Future[bytes] | None = None
        try:
            remaining = self.size
            if remaining > 0:
                reading = loop.run_in_executor(None, fh.read, min(self.chunk_size, remaining))
            while reading is not None:
                chunk = await reading
                reading = None
                if not chunk:
                    raise FileChanged("the file got shorter while it was being sent")
                remaining -= len(chunk)
                if remaining > 0:  # read the next block while this one is sent
                    reading = loop.run_in_executor(None, fh.read, min(self.chunk_size, remaining))
                self.bytes_sent += len(chunk)
                yield chunk
            await asyncio.to_thread(self._check_after, fh)
        except FileNotFoundError as exc:
            raise FileChanged("the file disappeared while it was being sent") from exc
        finally:
            if reading is not None and not reading.done():  # abandoned mid-read: close once the read is over
                reading.add_done_callback(lambda _: fh.close())
            else:
                fh.close()  # a read-only descriptor: closing it does not block

    def _open(self) -> BinaryIO:
        fh = open(self.path, "rb")  # noqa: SIM115 - closed by chunks()
        try:
            self._check(os.fstat(fh.fileno()))
        except BaseException:
            fh.close()
            raise
        return fh

    def _check_after(self, fh: BinaryIO) -> None:
        self._check(os.fstat(fh.fileno()))
        self._check(os.stat(self.path))

    def _check(self, st: os.stat_result) -> None:
        if Signature.of(st) != self.expected:
            raise FileChanged("the file changed while it was being sent")
