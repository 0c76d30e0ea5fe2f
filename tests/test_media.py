"""Durations from file headers: real files of each format this machine can write."""

from __future__ import annotations

import importlib.util
import math
import struct
import wave
from pathlib import Path

import pytest

from watcher.media import AudioInfo, audio_info

SECONDS, RATE = 2.5, 44100


def write_wav(path: Path, seconds: float, rate: int, channels: int) -> Path:
    """Silent 16-bit PCM WAV with the stdlib."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(2 * channels * int(seconds * rate)))
    return path


def write_aiff(path: Path, seconds: float, rate: int, channels: int) -> Path:
    """Silent 16-bit AIFF from its published layout (FORM/COMM/SSND) with struct: ``aifc`` is deprecated."""
    frames = int(seconds * rate)
    exponent = rate.bit_length() - 1
    extended = struct.pack(">HQ", 16383 + exponent, rate << (63 - exponent))  # 80-bit IEEE float
    comm = struct.pack(">hLh", channels, frames, 16) + extended
    data = bytes(2 * channels * frames)
    ssnd = struct.pack(">LL", 0, 0) + data
    body = b"AIFF" + b"COMM" + struct.pack(">L", len(comm)) + comm + b"SSND" + struct.pack(">L", len(ssnd)) + ssnd
    path.write_bytes(b"FORM" + struct.pack(">L", len(body)) + body)
    return path


def write_with_essentia(path: Path, fmt: str, seconds: float, rate: int, channels: int) -> Path:
    """A stereo tone encoded by Essentia's AudioWriter (the local extra)."""
    if importlib.util.find_spec("essentia") is None:
        pytest.skip(f"{fmt}: Essentia (the local extra) is not installed, so no {fmt} file can be written here")
    import essentia
    import numpy as np

    essentia.log.infoActive = essentia.log.warningActive = False
    import essentia.standard as es

    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * math.pi * 440 * t)).astype(np.float32)
    es.AudioWriter(filename=str(path), format=fmt, sampleRate=rate)(np.stack([tone] * 2, axis=1))
    assert channels == 2  # AudioWriter writes stereo
    return path


@pytest.mark.parametrize(("channels", "rate"), [(1, 22050), (2, 44100), (6, 48000)])
def test_wav(tmp_path: Path, channels: int, rate: int) -> None:
    """A WAV's headers give the same answer whether its container is known already or sniffed by mutagen."""
    path = write_wav(tmp_path / "a.wav", SECONDS, rate, channels)
    assert audio_info(path) == AudioInfo(SECONDS, channels, rate, None)
    assert audio_info(path, container="wav") == AudioInfo(SECONDS, channels, rate, None)


def test_a_file_that_only_looks_like_a_wav_is_not_audio_said_so(tmp_path: Path) -> None:
    """Parsed as a WAV at once, a damaged one still has no duration and a reason, as when mutagen guesses."""
    cut = tmp_path / "cut.wav"
    cut.write_bytes(write_wav(tmp_path / "whole.wav", 1.0, RATE, 2).read_bytes()[:30])
    sniffed, known = audio_info(cut), audio_info(cut, container="wav")
    assert sniffed.duration is None and known.duration is None
    assert sniffed.reason and known.reason and "cut.wav" in known.reason


@pytest.mark.parametrize(("channels", "rate"), [(1, 22050), (2, 44100), (2, 96000)])
def test_aiff(tmp_path: Path, channels: int, rate: int) -> None:
    info = audio_info(write_aiff(tmp_path / "a.aiff", SECONDS, rate, channels))
    assert info.channels == channels and info.sample_rate == rate and info.reason is None
    assert info.duration == pytest.approx(SECONDS, abs=1e-6)


@pytest.mark.parametrize(
    ("fmt", "suffix", "slack"), [("flac", "flac", 0.01), ("ogg", "ogg", 0.01), ("mp3", "mp3", 0.1)]
)
def test_compressed_formats(tmp_path: Path, fmt: str, suffix: str, slack: float) -> None:
    """FLAC and Ogg are exact; MP3 adds encoder padding (tens of milliseconds)."""
    info = audio_info(write_with_essentia(tmp_path / f"a.{suffix}", fmt, SECONDS, RATE, 2))
    assert info.channels == 2 and info.sample_rate == RATE and info.reason is None
    assert info.duration is not None and abs(info.duration - SECONDS) <= slack, info


def test_m4a(tmp_path: Path) -> None:
    """M4A needs an AAC encoder: Essentia's AudioWriter has none, so this format is skipped here."""
    pytest.skip("m4a: no AAC encoder is available here (Essentia's AudioWriter writes wav, aiff, flac, ogg, mp3)")


def test_unknown_duration_says_why(tmp_path: Path) -> None:
    """Text named .wav, a cut header, an empty file and a missing file: no duration, and the reason."""
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n" * 10)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(write_wav(tmp_path / "whole.wav", 1.0, RATE, 2).read_bytes()[:30])
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    cases = {
        text: "notes.wav",
        cut: "cut.wav",
        empty: "empty.flac",
        tmp_path / "gone.mp3": "gone.mp3 cannot be read: No such file",
    }
    for path, expected in cases.items():
        info = audio_info(path)
        assert info.duration is None and info.reason and expected in info.reason, (path.name, info)
