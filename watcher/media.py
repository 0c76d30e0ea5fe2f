"""Duration, channels and sample rate of an audio file, read from its headers (no decoding).

Used where a size or a cost depends on how long the audio is: the bounds on what a delivery may hold,
and the minutes a dry run would send. ``mutagen`` reads WAV, AIFF, FLAC, MP3, M4A and Ogg headers in
pure Python; when it cannot tell, :class:`AudioInfo` says why instead of guessing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import IO

from watcher.names import display

FORMATS = "WAV, AIFF, FLAC, MP3, M4A, Ogg"


@dataclass(frozen=True)
class AudioInfo:
    """What the headers say; each field None when unknown, ``reason`` saying why when the duration is."""

    duration: float | None
    channels: int | None
    sample_rate: int | None
    reason: str | None = None


def audio_info(
    path: str | os.PathLike[str], fileobj: IO[bytes] | None = None, *, container: str | None = None
) -> AudioInfo:
    """The duration (seconds), channels and sample rate ``path``'s headers give; never raises for a bad file.

    ``fileobj`` (its content, already read, named ``path``) is parsed instead of opening ``path`` again.
    ``container`` is what the first bytes showed (``audiofile.sniff_format``): a WAV is then parsed as one at once,
    without asking every format mutagen knows to score the file (the same parser such a file gets anyway).
    """
    import mutagen  # here, not at the top: the daemon starts without it (it is needed for the first file)
    from mutagen.wave import WAVE

    options = [WAVE] if container == "wav" else None
    try:
        parsed = mutagen.File(fileobj if fileobj is not None else os.fspath(path), options=options)
    except mutagen.MutagenError as exc:
        cause = exc.__cause__ or exc.__context__ or exc
        if isinstance(cause, OSError):
            return _unknown(f"{display(path)} cannot be read: {cause.strerror or cause}")
        return _unknown(f"the headers of {display(path)} are damaged or not audio: {exc}")
    except OSError as exc:
        return _unknown(f"{display(path)} cannot be read: {exc.strerror or exc}")
    if parsed is None or getattr(parsed, "info", None) is None:
        return _unknown(f"{display(path)} is not in a format whose headers can be read ({FORMATS})")
    info = parsed.info
    channels = _positive_int(getattr(info, "channels", None))
    rate = _positive_int(getattr(info, "sample_rate", None))
    if rate is None and type(parsed).__name__ == "OggOpus":
        rate = 48000  # Opus always decodes at 48 kHz; its header holds the input rate only
    length = getattr(info, "length", None)
    if not isinstance(length, int | float) or length <= 0:
        return AudioInfo(None, channels, rate, f"the headers of {display(path)} give no duration")
    return AudioInfo(float(length), channels, rate, None)


# The lowest byte rate a file of each container plausibly has: its size over this is an upper bound of its length.
# Lossy formats: 32 kbit/s; PCM: 8 kHz, 8-bit, mono (the header's rate and channels, when given, at 8 bits);
# FLAC: an eighth of that (near-silence compresses far below any PCM rate).
LOWEST_BYTE_RATE = {"mp3": 4000.0, "ogg": 4000.0, "m4a": 4000.0, "wav": 8000.0, "aiff": 8000.0, "flac": 1000.0}


def charged_seconds(info: AudioInfo, size: int, container: str | None) -> tuple[float, bool]:
    """The audio seconds a paid request for this file is charged: ``(seconds, estimated)``.

    The header's duration when it gives one; else an upper bound from the size over the format's lowest plausible
    byte rate (``estimated``), never 0, to be settled to the real duration once it is known.
    """
    if info.duration:
        return info.duration, False
    rate = LOWEST_BYTE_RATE.get(container or "", 1000.0)
    if container in ("wav", "aiff") and info.sample_rate and info.channels:
        rate = float(info.sample_rate * info.channels)  # 8 bits a sample: the lowest PCM depth
    return max(size, 1) / rate, True


def _unknown(reason: str) -> AudioInfo:
    return AudioInfo(None, None, None, reason)


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
