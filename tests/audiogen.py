"""Audio with known truth for tests and benchmarks, generated with numpy and written as 16-bit PCM WAV with the stdlib.

Signals are float arrays in [-1, 1]: shape (n,) for mono, (n, channels) for more channels.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

RATE = 44100
NOTES = {"C": 0, "C#": 1, "Db": 1, "D": 2, "D#": 3, "Eb": 3, "E": 4, "F": 5, "F#": 6, "Gb": 6, "G": 7}
NOTES |= {"G#": 8, "Ab": 8, "A": 9, "A#": 10, "Bb": 10, "B": 11}


def write_wav(path: Path | str, samples: np.ndarray, rate: int = RATE) -> Path:
    """Write float samples in [-1, 1], shaped (n,) for mono or (n, channels), as 16-bit PCM; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = samples if samples.ndim == 2 else samples[:, None]
    pcm = np.clip(np.round(data * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(data.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def sine(freq: float, seconds: float, peak_dbfs: float, rate: int = RATE, channels: int = 1) -> np.ndarray:
    """A sine peaking at ``peak_dbfs`` (0 dBFS = full scale), identical in every channel."""
    t = np.arange(int(seconds * rate)) / rate
    mono = (10 ** (peak_dbfs / 20)) * np.sin(2 * np.pi * freq * t)
    return mono if channels == 1 else np.repeat(mono[:, None], channels, axis=1)


def silence(seconds: float, rate: int = RATE, channels: int = 2) -> np.ndarray:
    """Digital silence: every sample exactly zero (stereo by default)."""
    return np.zeros((int(seconds * rate), channels)) if channels > 1 else np.zeros(int(seconds * rate))


def click_track(bpm: float, seconds: float, rate: int = RATE) -> np.ndarray:
    """Mono: short decaying 1 kHz clicks on every beat, accented on the first of four; the first click at 0 s."""
    out = np.zeros(int(seconds * rate))
    click_len = int(0.03 * rate)
    t = np.arange(click_len) / rate
    click = np.sin(2 * np.pi * 1000 * t) * np.exp(-t * 120)
    period = 60.0 / bpm
    n = 0
    while (start := int(n * period * rate)) + click_len < len(out):
        out[start : start + click_len] += click * (0.9 if n % 4 == 0 else 0.6)
        n += 1
    return out


def chord_progression(
    seconds_per_chord: float = 2.0,
    repeats: int = 3,
    rate: int = RATE,
    *,
    tonic: str = "C",
    scale: str = "major",
) -> np.ndarray:
    """Mono I-IV-V-I (minor: i-iv-V-i) triads with a few harmonics in the given key, repeated, peaking at 0.7."""
    base = 261.63 * 2 ** (NOTES[tonic] / 12)  # the tonic in the octave of middle C
    third = 4 if scale == "major" else 3
    triads = [(0, third, 7), (5, 5 + third, 12), (7, 11, 14), (0, third, 7)]
    t = np.arange(int(seconds_per_chord * rate)) / rate
    envelope = np.minimum(1, t * 20) * np.exp(-t * 0.8)
    parts = []
    for _ in range(repeats):
        for triad in triads:
            freqs = [base * 2 ** (s / 12) for s in triad]
            tone = sum(sum(np.sin(2 * np.pi * f * h * t) / h for h in (1, 2, 3)) for f in freqs)
            parts.append(tone * envelope)
    music = np.concatenate(parts)
    return music / np.max(np.abs(music)) * 0.7
