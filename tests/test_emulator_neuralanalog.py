"""The processing service emulator's own parts: the streamed multipart parser, the emulated processing,
the archives it builds (clean, incomplete, hostile), and its refusals."""

from __future__ import annotations

import asyncio
import hashlib
import io
import wave
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest

from tests.audiogen import sine, write_wav
from tests.conftest import Service, body
from watcher.emulator import audio_processing as proc
from watcher.emulator.multipart import MultipartParser
from watcher.errors import Rejected, RetryLater
from watcher.safezip import BadArchive, extract_zip
from watcher.services.multipart import MultipartBody
from watcher.services.neuralanalog import NeuralAnalogClient

pytestmark = [
    pytest.mark.bill_exempt("the emulator's own behaviour, through the client alone: no ledger"),
    pytest.mark.usefixtures("gate_stand_in"),
]


class Blob:
    """An in-memory AudioSource for parser tests."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name, self.size, self.data = name, len(data), data

    async def chunks(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), 1000):
            yield self.data[i : i + 1000]


def encode(b: MultipartBody) -> bytes:
    async def collect() -> bytes:
        return b"".join([chunk async for chunk in b])

    return asyncio.run(collect())


def parse(raw: bytes, boundary: str, step: int) -> tuple[MultipartParser, dict[str, bytes]]:
    sinks: dict[str, io.BytesIO] = {}

    class Sink(io.BytesIO):
        def close(self) -> None:  # keep the bytes readable after the parser closes the sink
            pass

    def open_sink(field: str, filename: str) -> IO[bytes]:
        sinks[field] = Sink()
        return sinks[field]

    parser = MultipartParser(boundary, open_sink)
    for i in range(0, len(raw), step):
        parser.feed(raw[i : i + step])
    parser.close()
    return parser, {k: v.getvalue() for k, v in sinks.items()}


@pytest.mark.parametrize("step", [1, 7, 61, 4096, 1 << 20])
def test_multipart_round_trip_in_any_chunking(step: int) -> None:
    """What MultipartBody encodes, the parser decodes, wherever the chunks split the boundaries."""
    data = bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n"
    b = MultipartBody("audio", Blob('a "b"\r\n.wav', data), {"file_source": "from_file", "note": "é"})
    raw = encode(b)
    assert len(raw) == b.length and b.complete and b.sent == len(data)
    parser, files = parse(raw, b.boundary, step)
    assert parser.fields == {"file_source": "from_file", "note": "é"}
    assert files == {"audio": data}
    (part,) = [p for p in parser.parts if p.filename is not None]
    assert part.filename == 'a "b"\r\n.wav' and part.size == len(data)
    assert part.sha256 == hashlib.sha256(data).hexdigest()


def test_multipart_file_first_and_malformed_bodies() -> None:
    """Parts may come in any order; a body without its closing boundary, or with a preamble (as the service's own
    parser, python-multipart, refuses one), is an error."""
    raw = (
        b"--XyZ\r\nContent-Disposition: form-data; name=audio; filename=x.wav\r\n\r\nRIFF"
        b'\r\n--XyZ\r\nContent-Disposition: form-data; name="file_source"\r\n\r\nfrom_file\r\n--XyZ--\r\nepilogue'
    )
    parser, files = parse(raw, "XyZ", 5)
    assert files == {"audio": b"RIFF"} and parser.fields == {"file_source": "from_file"}
    with pytest.raises(ValueError, match="ended early"):
        parse(raw[:60], "XyZ", 5)
    with pytest.raises(ValueError, match="boundary"):
        parse(b"preamble\r\n" + raw, "XyZ", 5)
    with pytest.raises(ValueError, match="without a Content-Disposition"):
        parse(b"--XyZ\r\nContent-Type: text/plain\r\n\r\nx\r\n--XyZ--", "XyZ", 3)


def test_multipart_streams_files_to_their_sink_and_bounds_fields_and_headers() -> None:
    """A file part reaches its sink while the body is still arriving (whatever its size); a text field over 1 MiB
    and part headers over 16 KiB are refused."""
    from watcher.emulator.multipart import MAX_FIELD_BYTES, MAX_HEADER_BYTES

    data = bytes(range(256)) * (3 * MAX_FIELD_BYTES // 256)
    head = b"--XyZ\r\nContent-Disposition: form-data; name=audio; filename=x.wav\r\n\r\n"
    sink = io.BytesIO()
    parser = MultipartParser("XyZ", lambda field, filename: sink)
    parser.feed(head + data)
    assert len(sink.getvalue()) >= len(data) - 16 and sink.getvalue() == data[: len(sink.getvalue())]
    parser.feed(b"\r\n--XyZ--\r\n")
    parser.close()
    assert parser.parts[0].size == len(data) and parser.parts[0].sha256 == hashlib.sha256(data).hexdigest()
    field = b"--XyZ\r\nContent-Disposition: form-data; name=note\r\n\r\n" + b"n" * (MAX_FIELD_BYTES + 1)
    with pytest.raises(ValueError, match="'note' is too large"):
        parse(field + b"\r\n--XyZ--\r\n", "XyZ", 1 << 16)
    headers = b"".join(b"X-Pad: " + b"p" * 4000 + b"\r\n" for _ in range(MAX_HEADER_BYTES // 4000 + 1))
    with pytest.raises(ValueError, match="part headers too long"):
        parse(b"--XyZ\r\n" + headers + b"Content-Disposition: form-data; name=a\r\n\r\nx\r\n--XyZ--", "XyZ", 999)


def read_pcm(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())


def test_emulated_processing(tmp_path: Path) -> None:
    """Mastering peaks at -1 dBFS; the stems of every preset sum back to their source; restored is a copy."""
    src = write_wav(tmp_path / "src.wav", sine(330, 3.0, -12, channels=2) + sine(60, 3.0, -18, channels=2))
    proc.master(src, tmp_path / "m.wav")
    mastered = read_pcm(tmp_path / "m.wav")
    assert abs(int(np.abs(mastered.astype("i4")).max()) - round(32767 * 10 ** (-1 / 20))) <= 1
    original = read_pcm(src).astype("i4")
    for preset, names in proc.STEM_NAMES.items():
        stems = proc.split(src, tmp_path / preset, preset)
        assert [p.name for p in stems] == [f"{n}.wav" for n in names]
        total = sum(read_pcm(p).astype("i4") for p in stems)
        assert np.abs(total - original).max() <= len(names)  # rounding of each band, nothing more
    proc.restore(src, tmp_path / "r.wav")
    assert (tmp_path / "r.wav").read_bytes() == src.read_bytes()
    mp3 = tmp_path / "x.mp3"
    mp3.write_bytes(b"ID3\x03" + bytes(500))
    proc.master(mp3, tmp_path / "m.mp3")
    assert (tmp_path / "m.mp3").read_bytes() == mp3.read_bytes()


def finished(na: Service, tmp_path: Path, stems: bool = True) -> tuple[str, dict[str, str]]:
    """Upload a tone, master it, split the master; every job complete at once."""
    na.emu.faults.polls_needed = 0
    audio = write_wav(tmp_path / "Song.wav", sine(440, 0.5, -6, channels=2))

    async def flow(c: NeuralAnalogClient) -> tuple[str, dict[str, str]]:
        audio_id = await c.upload(body(audio))
        mastered = await c.master(audio_id, {})
        ids = {"mastered": mastered}
        if stems:
            ids["split"] = await c.create_stems("mastered_id", mastered, {"preset": "4_tracks"})
        return audio_id, ids

    return na.run(flow)


def fetch_zip(na: Service, tmp_path: Path, audio_id: str, versions: list[str]) -> tuple[Path, bool]:
    async def flow(c: NeuralAnalogClient) -> tuple[Path, bool]:
        offer = await c.request_archive(audio_id=audio_id, versions=versions)
        assert offer.download_url
        await c.download_archive(offer.download_url, tmp_path / "a.zip")
        return tmp_path / "a.zip", offer.archive_incomplete

    return na.run(flow)


def test_archives_hold_tracks_or_stems(na: Service, tmp_path: Path) -> None:
    """Track versions at the top, stems in a folder per version, an EMULATED note; one file less if incomplete."""
    audio_id, _ = finished(na, tmp_path)
    zip_path, incomplete = fetch_zip(na, tmp_path, audio_id, ["original", "mastered"])
    assert not incomplete
    assert sorted(zipfile.ZipFile(zip_path).namelist()) == [
        "EMULATED.txt",
        "Song (mastered).wav",
        "Song (original).wav",
    ]
    zip_path, _ = fetch_zip(na, tmp_path, audio_id, ["mastered_stems"])
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist())[1:] == [f"mastered_stems/{n}.wav" for n in ("bass", "drums", "other", "vocals")]
        assert b"EMULATED OUTPUT" in zf.read("EMULATED.txt")
    na.emu.faults.archive_incomplete = 1
    zip_path, incomplete = fetch_zip(na, tmp_path, audio_id, ["mastered_stems"])
    assert incomplete and len(zipfile.ZipFile(zip_path).namelist()) == 4


def test_archive_refusals(na: Service, tmp_path: Path) -> None:
    """Mixed track and stem versions, versions never made, and unfinished jobs are answered 422 or 409."""
    audio_id, _ = finished(na, tmp_path, stems=False)
    for versions, detail, error in [
        (["original", "restored"], "restored of .* is not complete", RetryLater),
        (["restored_stems"], "restored_stems of .* is not complete", RetryLater),
        (["loud"], "unknown value", Rejected),
    ]:
        with pytest.raises(error, match=detail):
            na.run(lambda c, v=versions: c.request_archive(audio_id=audio_id, versions=v))
    na.emu.faults.polls_needed = 1
    unfinished = na.run(lambda c: c.master(audio_id, {}))
    with pytest.raises(Rejected, match="HTTP 409"):
        na.run(lambda c: c.download_object("mastered", unfinished, tmp_path / "m.wav"))


def test_non_audio_upload_fails_its_job(na: Service, tmp_path: Path) -> None:
    """Bytes that are not audio are accepted, and the audio job then reports is_failed."""
    na.emu.faults.polls_needed = 0
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"hello, not audio" * 10)

    async def flow(c: NeuralAnalogClient) -> bool:
        return (await c.status("audio", await c.upload(body(junk)))).is_failed

    assert na.run(flow)


@pytest.fixture
def leftovers(tmp_path: Path) -> Iterator[Path]:
    dest = tmp_path / "dest"
    yield dest
    assert not dest.exists() or list(dest.iterdir()) == []


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        ("dotdot", "'..' in its path"),
        ("absolute", "absolute path"),
        ("symlink", "a link"),
        ("device", "a special file"),
        ("oversized", "more than the limit"),
        ("truncated", "not a zip file"),
    ],
)
def test_hostile_archives_are_refused(na: Service, tmp_path: Path, leftovers: Path, attack: str, reason: str) -> None:
    """Every zip attack the emulator serves is really in the zip, and safe extraction refuses it."""
    audio_id, _ = finished(na, tmp_path, stems=False)
    na.emu.faults.zip_attack, na.emu.faults.zip_bomb_bytes = attack, 8 << 20
    zip_path, _ = fetch_zip(na, tmp_path, audio_id, ["original"])
    if attack == "oversized":
        assert zip_path.stat().st_size < 1 << 20
    with pytest.raises(BadArchive, match=reason):
        extract_zip(zip_path, leftovers, max_total_bytes=4 << 20, max_entries=20)
