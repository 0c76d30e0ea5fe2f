"""Local analysis with Essentia on generated audio whose truth is known."""

from __future__ import annotations

import asyncio
import math

import pytest

pytest.importorskip("essentia", reason="the local extra (essentia) is not installed")
np = pytest.importorskip("numpy")

from tests.audiogen import chord_progression, click_track, silence, sine, write_wav  # noqa: E402
from watcher.local import LOCAL_MODELS, available  # noqa: E402
from watcher.local.essentia_models import analyze_file  # noqa: E402
from watcher.local.pool import LocalAnalyzer  # noqa: E402

pytestmark = pytest.mark.timeout(120)
ALL = ["key", "bpm_degara", "loudness-ebur128"]


def test_available_and_names():
    """The package reports Essentia as available and names models as the service returns them."""
    assert available()
    assert LOCAL_MODELS == ("key", "bpm_degara", "loudness_ebur128")


def test_click_track_reads_120_bpm(tmp_path):
    """A 120 BPM click track reads 120 ± 1 BPM, with beats half a second apart."""
    out = analyze_file(str(write_wav(tmp_path / "click.wav", click_track(120, 30))), ["bpm_degara"])
    result = out["results"]["bpm_degara"]
    assert result["model_name"] == "bpm_degara"
    assert abs(result["results"]["bpm"] - 120) <= 1, result["results"]["bpm"]
    beats = np.diff(result["results"]["beat_positions"])
    assert abs(float(np.median(beats)) - 0.5) < 0.02


def test_chord_progression_reads_c_major(tmp_path):
    """I-IV-V-I in C reads as C major, shaped like the service's key results."""
    out = analyze_file(str(write_wav(tmp_path / "chords.wav", chord_progression())), ["key:1"])
    results = out["results"]["key:1"]["results"]
    assert results["key"] == ["C"] and results["scale"] == ["major"]
    assert len(results["strength"]) == 1 and 0 < results["strength"][0] <= 1


def test_stereo_sine_integrated_loudness(tmp_path):
    """A stereo 997 Hz sine peaking at -20 dBFS reads -20.0 LUFS within 0.1 LU (K-weighting is ~0 dB there)."""
    level = -20.0
    path = write_wav(tmp_path / "sine.wav", sine(997, 10, level, channels=2))
    results = analyze_file(str(path), ["loudness-ebur128"])["results"]["loudness-ebur128"]
    assert results["model_name"] == "loudness_ebur128"
    r = results["results"]
    # Two channels of mean square A²/2 each: -0.691 + 10·log10(A²) + K(997 Hz) ≈ 20·log10(A).
    expected = 20 * math.log10(10 ** (level / 20))
    assert abs(r["integratedLoudness"][0] - expected) < 0.1, r["integratedLoudness"]
    assert len(r["momentaryLoudness"]) == 1 and len(r["momentaryLoudness"][0]) > 50
    assert len(r["shortTermLoudness"][0]) > 50 and len(r["loudnessRange"]) == 1


def test_mono_is_measured_as_one_channel(tmp_path):
    """The same sine in a mono file reads 3 dB lower than in stereo: the channel is not doubled."""
    mono = write_wav(tmp_path / "mono.wav", sine(997, 10, -20.0))
    stereo = write_wav(tmp_path / "stereo.wav", sine(997, 10, -20.0, channels=2))
    m = analyze_file(str(mono), ["loudness-ebur128"])["results"]["loudness-ebur128"]["results"]
    s = analyze_file(str(stereo), ["loudness-ebur128"])["results"]["loudness-ebur128"]["results"]
    assert abs((s["integratedLoudness"][0] - m["integratedLoudness"][0]) - 3.01) < 0.1


def test_silence_and_short_clips_are_guarded(tmp_path):
    """Digital silence fails every model with a reason; a 1 s clip fails tempo but keeps key and loudness."""
    quiet = analyze_file(str(write_wav(tmp_path / "silence.wav", silence(5))), ALL)
    assert quiet["results"] == {}
    assert all("digital silence" in quiet["errors"][m] for m in ALL)
    short = analyze_file(str(write_wav(tmp_path / "short.wav", sine(440, 1, -12, channels=2))), ALL)
    assert "too short for tempo" in short["errors"]["bpm_degara"]
    assert set(short["results"]) == {"key", "loudness-ebur128"}


def test_unreadable_and_unknown(tmp_path):
    """Bytes the decoder cannot read give per-model errors; a model it does not have is an error, not a guess."""
    junk = tmp_path / "junk.wav"
    junk.write_bytes(np.random.default_rng(1).bytes(50_000))
    out = analyze_file(str(junk), ALL)
    assert out["results"] == {} and all("cannot read" in out["errors"][m] for m in ALL)
    path = write_wav(tmp_path / "tone.wav", sine(440, 2, -12))
    mixed = analyze_file(str(path), ["key", "mood_happy"])
    assert "key" in mixed["results"] and "not available in the local backend" in mixed["errors"]["mood_happy"]


def test_files_over_the_limit_are_refused(tmp_path):
    """A file longer than max_seconds is refused before decoding, for bounded memory."""
    path = write_wav(tmp_path / "long.wav", sine(440, 3, -12))
    out = analyze_file(str(path), ALL, max_seconds=2)
    assert all("over the local limit" in out["errors"][m] for m in ALL)


def test_pool_runs_files_concurrently(tmp_path):
    """Two files go through the process pool off the event loop, each with its own results."""
    a = write_wav(tmp_path / "a.wav", sine(440, 3, -12, channels=2))
    b = write_wav(tmp_path / "b.wav", sine(440, 3, -24, channels=2))

    async def go():
        async with LocalAnalyzer(workers=2) as pool:
            return await asyncio.gather(
                pool.analyze(str(a), ["loudness-ebur128"]), pool.analyze(str(b), ["loudness-ebur128"])
            )

    ra, rb = asyncio.run(go())
    la = ra["results"]["loudness-ebur128"]["results"]["integratedLoudness"][0]
    lb = rb["results"]["loudness-ebur128"]["results"]["integratedLoudness"][0]
    assert abs((la - lb) - 12) < 0.2


def test_daemon_without_key_uses_local_analysis(tmp_path, run_daemon):
    """No API key and the extra installed: `auto` picks local, and the sidecar says so, with real results."""
    import json

    from tests.conftest import wait_for
    from watcher.config import AnalysisConfig, FolderConfig, Settings

    inbox = tmp_path / "in"
    inbox.mkdir()
    settings = Settings(
        state_dir=tmp_path / "state",
        folders=(FolderConfig(path=inbox, settle_seconds=0.2),),
        analysis=AnalysisConfig(base_url="http://127.0.0.1:9"),
    )
    d = run_daemon(settings)
    write_wav(tmp_path / "chords.wav", chord_progression()).rename(inbox / "chords.wav")
    sidecar = inbox / "chords.wav.analysis.json"
    wait_for(sidecar.exists, timeout=60)
    d.stop()
    doc = json.loads(sidecar.read_text())
    assert doc["backend"]["name"] == "local" and doc["backend"]["essentia_version"]
    assert doc["models"]["key"]["results"]["key"] == ["C"]
    assert set(doc["models"]) == {"key", "bpm_degara", "loudness_ebur128"}


def test_emulator_answers_with_local_analysis(tmp_path):
    """The emulator's three local models come from real analysis when the extra is installed."""
    from tests.test_analysis_client import analyse
    from watcher.emulator import Emulator

    path = write_wav(tmp_path / "chords.wav", chord_progression())
    with Emulator(use_local=True) as emu:
        report, _ = analyse(emu.url, path, ["key", "loudness-ebur128", "mood_happy"], key=None)
    assert report.results["key"].results["key"] == ["C"]
    assert report.results["loudness-ebur128"].model_name == "loudness_ebur128"
    assert "activations" in report.results["mood_happy"].results  # not local: hash-derived stand-in


def test_backend_choice_is_logged_with_its_reason(tmp_path, monkeypatch):
    """auto: remote with a key, local without; with neither, start-up fails saying what to do."""
    from pydantic import SecretStr
    from structlog.testing import capture_logs

    import watcher.local
    from watcher.analyzers import choose_backend
    from watcher.config import AnalysisConfig, Settings
    from watcher.errors import ConfigError
    from watcher.pipeline import Pipeline

    assert choose_backend(AnalysisConfig(api_key=SecretStr("k-123456")))[0] == "remote"
    with capture_logs() as logs:
        pipeline = Pipeline(Settings(state_dir=tmp_path / "s"))
    asyncio.run(pipeline.aclose())
    (line,) = [e for e in logs if e["event"] == "analysis.backend"]
    assert line["backend"] == "local" and "no API key" in line["reason"]
    monkeypatch.setattr(watcher.local, "available", lambda: False)
    with pytest.raises(ConfigError, match=r'pip install "watcher\[local\]"'):
        choose_backend(AnalysisConfig())
    with pytest.raises(ConfigError, match="needs the local extra"):
        choose_backend(AnalysisConfig(backend="local"))
