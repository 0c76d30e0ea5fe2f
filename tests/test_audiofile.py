"""Audio files on disk: read once for hash and body, streamed bodies and their change checks."""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_settings, query, wait_for, write_tone
from watcher.audiofile import SMALL, FileBody, read_settled, sha256_of, signature
from watcher.errors import FileChanged

pytestmark = pytest.mark.timeout(60)


def collect(body: FileBody, after_first: Callable[[], None] | None = None) -> list[bytes]:
    """Every chunk the body yields; ``after_first`` runs once the first chunk was handed over."""

    async def run() -> list[bytes]:
        chunks: list[bytes] = []
        async for chunk in body.chunks():
            chunks.append(chunk)
            if after_first is not None and len(chunks) == 1:
                after_first()
        return chunks

    return asyncio.run(run())


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


class ReadCounter:
    """Counts the opens of one path for reading and the bytes read through them, whatever module opens it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
        self.path = os.fspath(path)
        self.opens = 0
        self.bytes = 0
        real = builtins.open

        def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            fh = real(file, *args, **kwargs)
            mode = str(args[0] if args else kwargs.get("mode", "r"))
            if isinstance(file, str | os.PathLike) and os.fspath(file) == self.path and not set(mode) & set("wax+"):
                self.opens += 1
                return _Counted(fh, self)
            return fh

        monkeypatch.setattr(builtins, "open", counting_open)


class _Counted:
    def __init__(self, fh: Any, counter: ReadCounter) -> None:
        self._fh, self._counter = fh, counter

    def read(self, *args: Any) -> bytes:
        data: bytes = self._fh.read(*args)
        self._counter.bytes += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        n: int = self._fh.readinto(buf)
        self._counter.bytes += n
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> _Counted:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


@pytest.mark.parametrize("size", [1, 1000, SMALL, SMALL + 1, 3 * SMALL + 7])
def test_read_settled_hash_equals_sha256_of(tmp_path: Path, size: int) -> None:
    """The hash of the one read is sha256_of's; the content comes back whole for a small file only."""
    path = random_file(tmp_path / "a.wav", size)
    digest, content = read_settled(path, signature(path))
    assert digest == sha256_of(path)[1]
    if size <= SMALL:
        assert content == path.read_bytes()
    else:
        assert content is None


def test_read_settled_refuses_another_revision(tmp_path: Path) -> None:
    """A file whose signature is not the settled one, or that is gone, is FileChanged."""
    path = random_file(tmp_path / "a.wav", 5000)
    settled = signature(path)
    with path.open("ab") as fh:
        fh.write(b"more")
    with pytest.raises(FileChanged):
        read_settled(path, settled)
    path.unlink()
    with pytest.raises(FileChanged):
        read_settled(path, settled)


@pytest.mark.parametrize(("size", "chunk"), [(0, 64), (64, 64), (65, 64), (1 << 20, 1 << 16), ((1 << 20) + 3, 1 << 16)])
def test_streamed_chunks_keep_their_boundaries_and_bytes(tmp_path: Path, size: int, chunk: int) -> None:
    """Read ahead or not, the chunks are the file's bytes in order, each ``chunk_size`` but the last."""
    path = random_file(tmp_path / "a.wav", size)
    body = FileBody(path, signature(path), chunk_size=chunk)
    chunks = collect(body)
    assert b"".join(chunks) == path.read_bytes()
    assert all(len(c) == chunk for c in chunks[:-1]) and all(0 < len(c) <= chunk for c in chunks)
    assert body.bytes_sent == size
    assert b"".join(collect(body)) == path.read_bytes()  # a second iteration reads again from the start


@pytest.mark.parametrize("change", ["shorter", "longer", "replaced", "deleted"])
def test_a_file_changed_while_streaming_raises(tmp_path: Path, change: str) -> None:
    """Truncated, grown, replaced or deleted after the first chunk went out: FileChanged, never a silent body."""
    path = random_file(tmp_path / "a.wav", 1 << 20)
    body = FileBody(path, signature(path), chunk_size=1 << 16)

    def alter() -> None:
        if change == "shorter":
            os.truncate(path, 1000)
        elif change == "longer":
            with path.open("ab") as fh:
                fh.write(b"x" * 10)
        elif change == "replaced":
            random_file(tmp_path / "b.wav", 1 << 20)
            os.replace(tmp_path / "b.wav", path)
        else:
            path.unlink()

    with pytest.raises(FileChanged):
        collect(body, alter)


def test_an_abandoned_stream_leaves_no_open_file(tmp_path: Path) -> None:
    """A body dropped after its first chunk (the connection failed) closes its file, even with a read in flight."""
    path = random_file(tmp_path / "a.wav", 1 << 20)
    fds = len(os.listdir("/proc/self/fd"))

    async def run() -> None:
        chunks = FileBody(path, signature(path), chunk_size=1 << 16).chunks()
        await anext(chunks)
        await chunks.aclose()

    # The read in flight finishes in its worker thread (asyncio.run waits for the executor), and its callback
    # closes the file.
    asyncio.run(run())
    wait_for(lambda: len(os.listdir("/proc/self/fd")) <= fds, timeout=5, what="the abandoned body's file closed")
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_body_given_its_content_sends_it_without_reading_the_file(tmp_path: Path) -> None:
    """The settled content read once is what is sent: the file is not opened again (here: it is gone)."""
    path = random_file(tmp_path / "a.wav", 5000)
    settled = signature(path)
    _, content = read_settled(path, settled)
    path.unlink()
    body = FileBody(path, settled, content=content)
    assert b"".join(collect(body)) == content and body.bytes_sent == 5000
    with pytest.raises(ValueError):
        FileBody(path, settled, content=b"short")


def test_a_small_file_is_read_once_for_its_hash_header_and_upload(tmp_path, inbox, emulator, run_daemon, monkeypatch):
    """One analysis of a small file opens it once and reads its bytes once; the service gets them all, and
    the step's sha256 and sidecar are in the store with the job's release."""
    source = write_tone(tmp_path / "src.wav", 0.5)
    target = inbox / "once.wav"
    counter = ReadCounter(monkeypatch, target)
    d = run_daemon(make_settings(tmp_path, inbox, emulator.url))
    shutil.copy(source, target)
    sidecar = wait_for(lambda: (p := inbox / "once.wav.analysis.json").exists() and p, what="the sidecar")
    wait_for(lambda: query(tmp_path, "SELECT 1 FROM jobs WHERE state='done'"), what="the job's release")
    d.stop()
    size = target.stat().st_size
    assert size <= SMALL
    assert (counter.opens, counter.bytes) == (1, size)
    assert emulator.analysis.bytes_received == size
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    assert json.loads(sidecar.read_text())["source"]["sha256"] == digest
    row = query(tmp_path, "SELECT data FROM jobs WHERE state='done'")
    assert row is not None
    data = json.loads(row[0])
    assert data["sha256"] == digest and data["sidecar"] == str(sidecar)
    assert query(tmp_path, "SELECT sha256 FROM files WHERE path=?", str(target)) == (digest,)


def test_a_large_file_is_hashed_once_and_streamed_once(tmp_path, inbox, emulator, run_daemon, monkeypatch):
    """Above the small-file size, the hash pass and the upload each read the file once, and nothing else does."""
    data = b"RIFF" + (3 * SMALL).to_bytes(4, "little") + b"WAVE" + os.urandom(3 * SMALL - 4)
    target = inbox / "big.wav"
    counter = ReadCounter(monkeypatch, target)
    d = run_daemon(make_settings(tmp_path, inbox, emulator.url))
    (tmp_path / "big.wav").write_bytes(data)
    os.replace(tmp_path / "big.wav", target)
    wait_for(lambda: (inbox / "big.wav.analysis.json").exists(), what="the sidecar")
    d.stop()
    # The sniff reads the first bytes; the header parser reads a few more: the rest is one hash pass and one body.
    assert counter.bytes - 2 * len(data) < 64 << 10
    assert emulator.analysis.bytes_received == len(data)
