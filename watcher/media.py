"""What an audio file's header says: duration, channels, sample rate (mutagen; nothing is decoded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AudioInfo:
    """Header facts of an audio file; ``reason`` says why the duration is unknown when it is."""

    duration: float | None
    channels: int | None = None
    sample_rate: int | None = None
    reason: str | None = None


def audio_info(path: str | Path) -> AudioInfo:
    """The file's duration, channels and sample rate from its header (WAV, AIFF, FLAC, MP3, M4A, OGG)."""
    import mutagen

    try:
        parsed = mutagen.File(path)
    except (mutagen.MutagenError, OSError, ValueError) as exc:
        return AudioInfo(None, reason=f"the header cannot be read: {exc}")
    if parsed is None or getattr(parsed, "info", None) is None:
        return AudioInfo(None, reason="the header is not one of WAV, AIFF, FLAC, MP3, M4A or OGG")
    info = parsed.info
    length = getattr(info, "length", None)
    return AudioInfo(
        float(length) if length else None,
        getattr(info, "channels", None),
        getattr(info, "sample_rate", None),
        None if length else "the header gives no duration",
    )
