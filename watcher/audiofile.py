"""Audio files on disk: what a file's content says it is, its hash, and a change-checked streamed body.

Audio is never read whole: hashing and uploads read fixed-size chunks in a worker thread.
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

CHUNK = 1 << 20


@dataclass(frozen=True)
class Signature:
    """What identifies a version of a file without reading it: size, mtime and inode."""

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
        head = fh.read(64)
    if not head:
        raise BadInput("the file is empty (0 bytes)")
    fmt = sniff_format(head)
    if fmt is None:
        raise BadInput(
            f"the content is not audio (starts with {head[:8].hex(' ')}; expected WAV, FLAC, MP3, M4A, AIFF or OGG)"
        )
    return fmt


def _digest(fh: BinaryIO) -> tuple[int, str]:
    """(bytes read, sha256 hex) of an open file, read to its end in fixed-size chunks."""
    sha = hashlib.sha256()
    size = 0
    while chunk := fh.read(CHUNK):
        sha.update(chunk)
        size += len(chunk)
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


def _hash_file(path: str | Path, expected: Signature) -> str:
    with open(path, "rb") as fh:
        if Signature.of(os.fstat(fh.fileno())) != expected:
            raise FileChanged("the file changed after it settled")
        _, digest = _digest(fh)
        if Signature.of(os.fstat(fh.fileno())) != expected:
            raise FileChanged("the file changed while it was being hashed")
    return digest


def hash_file(path: str | Path, expected: Signature) -> str:
    """The file's sha256, read in chunks (blocking: call it in a worker thread); FileChanged if it moves underneath."""
    try:
        return _hash_file(path, expected)
    except FileNotFoundError as exc:
        raise FileChanged("the file disappeared") from exc


async def sha256_file(path: str | Path, expected: Signature) -> str:
    """:func:`hash_file` off the event loop."""
    return await asyncio.to_thread(hash_file, path, expected)


class FileBody:
    """A file streamed as a request body, checked against its settled signature before and after.

    ``chunks()`` returns a fresh iterator each time (a retry re-reads from the start). If the file's size,
    mtime or inode differ from ``expected`` at any point, the iterator raises FileChanged.
    """

    def __init__(self, path: str | Path, expected: Signature, *, chunk_size: int = CHUNK, name: str = "") -> None:
        self.path = Path(path)
        self.name = name or self.path.name
        self.size = expected.size
        self.expected = expected
        self.chunk_size = chunk_size
        self.bytes_sent = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            fh = await asyncio.to_thread(open, self.path, "rb")
        except FileNotFoundError as exc:
            raise FileChanged("the file disappeared before it was sent") from exc
        try:
            self._check(await asyncio.to_thread(os.fstat, fh.fileno()))
            remaining = self.size
            while remaining > 0:
                chunk = await asyncio.to_thread(fh.read, min(self.chunk_size, remaining))
                if not chunk:
                    raise FileChanged("the file got shorter while it was being sent")
                remaining -= len(chunk)
                self.bytes_sent += len(chunk)
                yield chunk
            self._check(await asyncio.to_thread(os.fstat, fh.fileno()))
            self._check(await asyncio.to_thread(os.stat, self.path))
        except FileNotFoundError as exc:
            raise FileChanged("the file disappeared while it was being sent") from exc
        finally:
            await asyncio.to_thread(fh.close)

    def _check(self, st: os.stat_result) -> None:
        if Signature.of(st) != self.expected:
            raise FileChanged("the file changed while it was being sent")
