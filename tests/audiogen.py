"""Audio with known truth, generated with numpy and written as 16-bit PCM WAV with the stdlib."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

RATE = 44100


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    """Write float samples in [-1, 1], shaped (n,) for mono or (n, channels), as 16-bit PCM."""
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
    """A sine of the given peak level; identical in every channel."""
    t = np.arange(int(seconds * rate)) / rate
    mono = (10 ** (peak_dbfs / 20)) * np.sin(2 * np.pi * freq * t)
    return mono if channels == 1 else np.repeat(mono[:, None], channels, axis=1)


def click_track(bpm: float, seconds: float, rate: int = RATE) -> np.ndarray:
    """Short decaying 1 kHz clicks on every beat, accented on the first of four."""
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


def chord_progression(seconds_per_chord: float = 2.0, repeats: int = 3, rate: int = RATE) -> np.ndarray:
    """I-IV-V-I in C major (C, F, G, C triads with a few harmonics), repeated."""
    chords = [(261.63, 329.63, 392.00), (349.23, 440.00, 523.25), (392.00, 493.88, 587.33), (261.63, 329.63, 392.00)]
    t = np.arange(int(seconds_per_chord * rate)) / rate
    envelope = np.minimum(1, t * 20) * np.exp(-t * 0.8)
    parts = []
    for _ in range(repeats):
        for chord in chords:
            tone = sum(sum(np.sin(2 * np.pi * f * h * t) / h for h in (1, 2, 3)) for f in chord)
            parts.append(0.15 * tone * envelope)
    bass = np.concatenate(parts)
    return bass / np.max(np.abs(bass)) * 0.7


def silence(seconds: float, rate: int = RATE, channels: int = 2) -> np.ndarray:
    return np.zeros((int(seconds * rate), channels)) if channels > 1 else np.zeros(int(seconds * rate))
