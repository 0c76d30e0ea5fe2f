"""The three local models, computed in one streaming decode of the file, shaped like the analysis service's results.

Runs in a worker process (see :mod:`watcher.local.pool`). Audio flows through an Essentia streaming network, so
memory grows by about 2 MiB per minute of audio instead of holding the decoded file. A model that cannot be
computed gets an error message; no value is ever invented.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

KEY_RATE = 44100.0  # KeyExtractor and RhythmExtractor2013 are tuned for (and the latter requires) 44.1 kHz
MIN_BEATS = 4  # fewer beats than this cannot support a tempo
MIN_LOUDNESS_SECONDS = 0.4  # one EBU R128 momentary block
SILENT_BLOCK_LUFS = -300.0  # Essentia gives -300.691 LUFS for a block whose every sample is zero
AVAILABLE = "key, bpm_degara, loudness-ebur128"
NAMES = {
    "key": "key",
    "bpm_degara": "bpm_degara",
    "loudness-ebur128": "loudness_ebur128",
    "loudness_ebur128": "loudness_ebur128",
}


def model_name(spec: str) -> str | None:
    """The service's name for a requested spec (``key:1`` -> ``key``), or None when not computed locally."""
    name, _, version = spec.partition(":")
    return NAMES.get(name.strip()) if version.strip() in ("", "1") else None


def _essentia() -> tuple[Any, Any]:
    import essentia

    essentia.log.infoActive = False
    essentia.log.warningActive = False
    # Only the streaming module: importing essentia.standard as well raised the peak by ~100 MiB on an hour of audio.
    import essentia.streaming as ess

    return essentia, ess


def analyze_file(path: str, models: Sequence[str], *, max_seconds: float | None = None) -> dict[str, Any]:
    """Analyse ``path`` for ``models``: ``{"results": {spec: {...}}, "errors": {spec: msg}, "essentia_version"}``.

    Each requested spec is a key of exactly one of ``results`` or ``errors``. ``max_seconds`` refuses longer files.
    """
    essentia, ess = _essentia()
    out: dict[str, Any] = {"results": {}, "errors": {}, "essentia_version": essentia.__version__}
    wanted: dict[str, str] = {}
    for spec in models:
        name = model_name(spec)
        if name is None:
            out["errors"][spec] = f"model {spec} is not available in the local backend; available: {AVAILABLE}"
        else:
            wanted[spec] = name
    if not wanted:
        return out

    try:
        rate, channels, duration = _metadata(essentia, ess, path)
        problem = _refusal(rate, channels, duration, max_seconds)
        measured = None if problem else _measure(essentia, ess, path, rate, set(wanted.values()))
    except RuntimeError as exc:
        problem, measured = f"the decoder cannot read this file: {exc}", None
    finally:
        # Connected streaming algorithms reference each other: their buffers (~10 MiB per minute of audio)
        # are freed only by the cycle collector, which a worker might otherwise not run for many files.
        gc.collect()
    if measured is None:
        for spec in wanted:
            out["errors"][spec] = problem
        return out
    for spec, name in wanted.items():
        answer = measured[name]
        if isinstance(answer, str):
            out["errors"][spec] = answer
        else:
            out["results"][spec] = {"model_name": name, "model_version": "1", "results": answer}
    return out


def _metadata(essentia: Any, ess: Any, path: str) -> tuple[float, int, float]:
    """Sample rate, channel count and (whole-second) duration, read from the container without decoding."""
    reader = ess.MetadataReader(filename=path, failOnError=True)
    pool = essentia.Pool()
    for name in ("sampleRate", "channels", "duration"):
        getattr(reader, name) >> (pool, name)
    for name in set(reader.outputNames()) - {"sampleRate", "channels", "duration"}:
        getattr(reader, name) >> None
    essentia.run(reader)
    return float(pool["sampleRate"]), int(pool["channels"]), float(pool["duration"])


def _refusal(rate: float, channels: int, duration: float, max_seconds: float | None) -> str | None:
    """Why the file is not decoded at all, or None."""
    if rate <= 0 or channels <= 0:
        return "the decoder found no audio stream in this file"
    if channels > 2:
        return (
            f"the file has {channels} channels; the local backend reads mono and stereo only "
            "(downmix it to stereo, or use the remote backend)"
        )
    if max_seconds is not None and duration > max_seconds:
        return f"the file is {duration:.0f} s long, over the configured local limit of {max_seconds:.0f} s"
    return None


def _measure(essentia: Any, ess: Any, path: str, rate: float, names: set[str]) -> dict[str, dict[str, Any] | str]:
    """Run one streaming network over the file; per model name, its results or an error message."""
    pool = essentia.Pool()
    loader = ess.AudioLoader(filename=path)
    for unused in ("sampleRate", "md5", "bit_rate", "codec"):
        getattr(loader, unused) >> None
    if "loudness_ebur128" in names:
        # Stereo as decoded: a mono file comes with a silent right channel, which is single-channel loudness.
        loudness = ess.LoudnessEBUR128(sampleRate=rate)
        loader.audio >> loudness.signal
        for name in loudness.outputNames():
            getattr(loudness, name) >> (pool, f"loudness.{name}")
    # The mono mix always runs: its 10 ms energies give the exact duration and whether the mix is digital silence.
    mixer = ess.MonoMixer(type="mix")
    loader.audio >> mixer.audio
    loader.numberChannels >> mixer.numberChannels
    hop = max(1, round(rate / 100))
    frames = ess.FrameCutter(
        frameSize=hop, hopSize=hop, startFromZero=True, lastFrameToEndOfFile=True, silentFrames="keep"
    )
    energy = ess.Energy()
    mixer.audio >> frames.signal
    frames.frame >> energy.array
    energy.energy >> (pool, "mono.energy")
    mono = mixer.audio
    if names & {"key", "bpm_degara"} and rate != KEY_RATE:
        resample = ess.Resample(inputSampleRate=rate, outputSampleRate=KEY_RATE)
        mixer.audio >> resample.signal
        mono = resample.signal
    if "key" in names:
        key = ess.KeyExtractor(sampleRate=KEY_RATE)
        mono >> key.audio
        for name in key.outputNames():
            getattr(key, name) >> (pool, f"key.{name}")
    if "bpm_degara" in names:
        rhythm = ess.RhythmExtractor2013(method="degara")
        mono >> rhythm.signal
        rhythm.bpm >> (pool, "rhythm.bpm")
        rhythm.ticks >> (pool, "rhythm.ticks")
        for unused in ("confidence", "estimates", "bpmIntervals"):
            getattr(rhythm, unused) >> None
    essentia.run(loader)
    return _shape(pool, names)


def _shape(pool: Any, names: set[str]) -> dict[str, dict[str, Any] | str]:
    """Turn the pool into the service's result shapes, applying the guards."""
    import numpy as np

    energies = np.asarray(_vector(pool, "mono.energy"))
    seconds = len(energies) / 100
    out: dict[str, dict[str, Any] | str] = {}
    if seconds == 0:
        return dict.fromkeys(names, "the file holds no audio samples")
    mono_silent = not bool(np.any(energies > 0))
    if "loudness_ebur128" in names:
        momentary = [float(x) for x in _vector(pool, "loudness.momentaryLoudness")]
        if seconds < MIN_LOUDNESS_SECONDS:
            out["loudness_ebur128"] = f"too short for loudness ({seconds:.2f} s; EBU R128 needs at least 0.4 s)"
        elif not any(x > SILENT_BLOCK_LUFS for x in momentary):
            out["loudness_ebur128"] = "digital silence: no loudness can be measured (every sample is zero)"
        else:
            out["loudness_ebur128"] = {
                "integratedLoudness": [float(pool["loudness.integratedLoudness"])],
                "loudnessRange": [float(pool["loudness.loudnessRange"])],
                "momentaryLoudness": [momentary],
                "shortTermLoudness": [[float(x) for x in _vector(pool, "loudness.shortTermLoudness")]],
            }
    silent = "digital silence: no {} can be measured (every sample of the mono mix is zero)"
    if "key" in names:
        if mono_silent:
            out["key"] = silent.format("key")
        elif float(pool["key.strength"]) <= 0:
            out["key"] = "no tonal content: no key can be measured (key strength 0)"
        else:
            out["key"] = {
                "key": [str(pool["key.key"])],
                "scale": [str(pool["key.scale"])],
                "strength": [float(pool["key.strength"])],
            }
    if "bpm_degara" in names:
        bpm = float(pool["rhythm.bpm"]) if pool.containsKey("rhythm.bpm") else 0.0
        if mono_silent:
            out["bpm_degara"] = silent.format("tempo")
        else:
            ticks = [float(t) for t in _vector(pool, "rhythm.ticks")]
            problem = _degenerate_tempo(bpm, ticks, seconds)
            out["bpm_degara"] = problem or {"bpm": bpm, "beat_positions": ticks}
    return out


def _degenerate_tempo(bpm: float, ticks: list[float], seconds: float) -> str | None:
    """Why a tempo result cannot be trusted (0 BPM, fewer than MIN_BEATS beats), or None when it can."""
    if bpm <= 0:
        return f"no beat was found in {seconds:.1f} s of audio (the tempo model gave 0 BPM)"
    if len(ticks) < MIN_BEATS:
        return (
            f"only {len(ticks)} beat{'s' if len(ticks) != 1 else ''} found in {seconds:.1f} s of audio; "
            f"a tempo needs at least {MIN_BEATS}"
        )
    return None


def _vector(pool: Any, key: str) -> Any:
    """A pooled vector, or an empty one when the algorithm produced none."""
    return pool[key] if pool.containsKey(key) else []
