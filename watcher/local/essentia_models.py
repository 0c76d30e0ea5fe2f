"""The three local models, computed from one decode of the file, shaped like the analysis service's results.

Runs in a worker process (see :mod:`watcher.local.pool`). A model that cannot be computed gets an error
message; no value is ever invented. Memory is bounded by refusing files longer than ``max_seconds``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

KEY_RATE = 44100.0
MIN_TEMPO_SECONDS = 10.0
MIN_LOUDNESS_SECONDS = 0.4
NAMES = {
    "key": "key",
    "bpm_degara": "bpm_degara",
    "loudness-ebur128": "loudness_ebur128",
    "loudness_ebur128": "loudness_ebur128",
}


def model_name(spec: str) -> str | None:
    """The service's name for a requested spec (``key:1`` -> ``key``), or None when not computed locally."""
    return NAMES.get(spec.split(":", 1)[0])


def _essentia() -> Any:
    import essentia

    essentia.log.infoActive = False
    essentia.log.warningActive = False
    import essentia.standard as es

    return essentia, es


def analyze_file(path: str, models: Sequence[str], *, max_seconds: float = 1200.0) -> dict[str, Any]:
    """Analyse ``path`` for ``models``: ``{"results": {spec: {...}}, "errors": {spec: msg}, "essentia_version"}``."""
    essentia, es = _essentia()
    import numpy as np

    out: dict[str, Any] = {"results": {}, "errors": {}, "essentia_version": essentia.__version__}
    wanted: dict[str, str] = {}
    for spec in models:
        name = model_name(spec)
        if name is None:
            out["errors"][spec] = (
                f"model {spec} is not available in the local backend (it computes key, bpm_degara and "
                "loudness-ebur128); use the remote backend for it"
            )
        else:
            wanted[spec] = name
    if not wanted:
        return out

    def fail_all(message: str) -> dict[str, Any]:
        for spec in wanted:
            out["errors"][spec] = message
        return out

    try:
        duration = float(es.MetadataReader(filename=path, failOnError=True)()[-4])
    except Exception as exc:
        return fail_all(f"the decoder cannot read this file: {exc}")
    if duration > max_seconds:
        return fail_all(
            f"the file is {duration:.0f} s long, over the local limit of {max_seconds:.0f} s "
            "(raise analysis.local_max_seconds, at about 140 MB of memory per minute, or use the remote backend)"
        )
    try:
        stereo, rate, channels, *_ = es.AudioLoader(filename=path)()
    except Exception as exc:
        return fail_all(f"the decoder cannot read this file: {exc}")
    seconds = len(stereo) / rate if rate else 0.0
    if len(stereo) == 0:
        return fail_all("the file holds no audio samples")
    if not np.any(stereo):
        return fail_all("digital silence: there is no key, tempo or loudness to measure")

    for spec, name in wanted.items():
        if name != "loudness_ebur128":
            continue
        if seconds < MIN_LOUDNESS_SECONDS:
            out["errors"][spec] = f"too short for loudness ({seconds:.2f} s; EBU R128 needs at least 0.4 s)"
            continue
        # A mono file decodes with a silent right channel: that already gives single-channel loudness.
        m, s, integrated, lra = es.LoudnessEBUR128(sampleRate=rate)(stereo)
        out["results"][spec] = _result(
            name,
            {
                "integratedLoudness": [float(integrated)],
                "loudnessRange": [float(lra)],
                "momentaryLoudness": [[float(x) for x in m]],
                "shortTermLoudness": [[float(x) for x in s]],
            },
        )

    if not any(n in ("key", "bpm_degara") for n in wanted.values()):
        return out
    if channels == 1:
        mono = stereo[:, 0].copy()
    else:
        mono = stereo[:, 0] * np.float32(0.5)
        mono += stereo[:, 1] * np.float32(0.5)
    del stereo
    if rate != KEY_RATE:
        mono = es.Resample(inputSampleRate=rate, outputSampleRate=KEY_RATE)(mono)
    for spec, name in wanted.items():
        if name == "key":
            key, scale, strength = es.KeyExtractor(sampleRate=KEY_RATE)(mono)
            out["results"][spec] = _result(name, {"key": [key], "scale": [scale], "strength": [float(strength)]})
        elif name == "bpm_degara":
            if seconds < MIN_TEMPO_SECONDS:
                out["errors"][spec] = (
                    f"too short for tempo ({seconds:.1f} s; at least {MIN_TEMPO_SECONDS:.0f} s are needed)"
                )
                continue
            bpm, ticks, *_ = es.RhythmExtractor2013(method="degara")(mono)
            if bpm <= 0:
                out["errors"][spec] = "no beat was found"
                continue
            out["results"][spec] = _result(name, {"bpm": float(bpm), "beat_positions": [float(t) for t in ticks]})
    return out


def _result(name: str, results: dict[str, Any]) -> dict[str, Any]:
    return {"model_name": name, "model_version": "1", "results": results}
