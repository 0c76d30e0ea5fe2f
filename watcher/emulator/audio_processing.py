"""The emulator's stand-in processing: deterministic, cheap, and clearly labelled as emulated.

restored = an exact copy of the original; mastered = a copy normalised to -1 dBFS peak; stems = simple
band splits of the source (WAV only; other formats are copied). None of it is real restoration,
mastering or source separation.
"""

from __future__ import annotations

import array
import shutil
import sys
import wave
from pathlib import Path

STEM_NAMES = {
    "2_tracks": ["vocals", "accompaniment"],
    "4_tracks": ["vocals", "drums", "bass", "other"],
    "6_tracks": ["vocals", "drums", "bass", "guitar", "piano", "other"],
    "acapella": ["vocals"],
    "instrumental": ["instrumental"],
}
NOTE = (
    "EMULATED OUTPUT from watcher's loopback emulator of the processing service.\n"
    "restored = a copy of the original; mastered = peak-normalised to -1 dBFS; stems = simple band splits.\n"
    "Nothing here was restored, mastered or separated for real.\n"
)


def _read_pcm16(path: Path) -> tuple[wave._wave_params, array.array[int]] | None:
    try:
        with wave.open(str(path), "rb") as w:
            params = w.getparams()
            if params.sampwidth != 2:
                return None
            samples = array.array("h")
            samples.frombytes(w.readframes(params.nframes))
    except (wave.Error, EOFError):
        return None
    if sys.byteorder == "big":
        samples.byteswap()
    return params, samples


def _write_pcm16(path: Path, params: wave._wave_params, samples: array.array[int]) -> None:
    if sys.byteorder == "big":
        samples = array.array("h", samples)
        samples.byteswap()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(params.nchannels)
        w.setsampwidth(2)
        w.setframerate(params.framerate)
        w.writeframes(samples.tobytes())


def restore(source: Path, dest: Path) -> None:
    shutil.copyfile(source, dest)


def master(source: Path, dest: Path) -> None:
    """Scale so the peak sits at -1 dBFS (WAV 16-bit); other files are copied."""
    pcm = _read_pcm16(source)
    if pcm is None:
        shutil.copyfile(source, dest)
        return
    params, samples = pcm
    peak = max((abs(s) for s in samples), default=0)
    if peak == 0:
        _write_pcm16(dest, params, samples)
        return
    gain = (32767 * 10 ** (-1 / 20)) / peak
    _write_pcm16(dest, params, array.array("h", (max(-32768, min(32767, round(s * gain))) for s in samples)))


def split(source: Path, dest_dir: Path, preset: str) -> list[Path]:
    """One file per stem name: successive one-pole low-pass bands of the source (copies if not WAV)."""
    names = STEM_NAMES.get(preset, STEM_NAMES["4_tracks"])
    dest_dir.mkdir(parents=True, exist_ok=True)
    pcm = _read_pcm16(source)
    out = []
    for i, name in enumerate(names):
        dest = dest_dir / f"{name}.wav"
        if pcm is None:
            shutil.copyfile(source, dest)
        else:
            params, samples = pcm
            alpha = 0.5 ** (i + 1)  # a different smoothing per stem: a crude, deterministic band
            ch = params.nchannels
            state = [0.0] * ch
            band = array.array("h", samples)
            for n in range(len(samples)):
                c = n % ch
                state[c] += alpha * (samples[n] - state[c])
                band[n] = int(state[c])
            _write_pcm16(dest, params, band)
        out.append(dest)
    return out
