"""Local analysis with Essentia on generated audio whose truth is known."""

from __future__ import annotations

import asyncio
import cmath
import math
import os
import re
import signal
import threading

import pytest

pytest.importorskip("essentia", reason="the local extra (essentia) is not installed")
np = pytest.importorskip("numpy")

from tests.audiogen import chord_progression, click_track, silence, sine, write_wav  # noqa: E402
from tests.conftest import wait_for  # noqa: E402
from watcher.local import LOCAL_MODELS, available  # noqa: E402
from watcher.local.essentia_models import analyze_file  # noqa: E402
from watcher.local.pool import LocalPool  # noqa: E402

pytestmark = pytest.mark.timeout(120)
ALL = ["key", "bpm_degara", "loudness-ebur128"]


def k_weighting_db(freq: float, rate: float) -> float:
    """Gain of the BS.1770 K-weighting (shelf, then high-pass) at ``freq``, from its published design."""
    k = math.tan(math.pi * 1681.974450955533 / rate)
    q, vh = 0.7071752369554196, 10 ** (3.999843853973347 / 20)
    vb, a0 = vh**0.4996667741545416, 1 + k / q + k * k
    shelf = ([(vh + vb * k / q + k * k) / a0, 2 * (k * k - vh) / a0, (vh - vb * k / q + k * k) / a0],
             [1, 2 * (k * k - 1) / a0, (1 - k / q + k * k) / a0])  # fmt: skip
    k = math.tan(math.pi * 38.13547087602444 / rate)
    q = 0.5003270373238773
    a0 = 1 + k / q + k * k
    highpass = ([1, -2, 1], [1, 2 * (k * k - 1) / a0, (1 - k / q + k * k) / a0])
    z = cmath.exp(-2j * math.pi * freq / rate)
    gain = 1.0
    for b, a in (shelf, highpass):
        gain *= abs((b[0] + b[1] * z + b[2] * z * z) / (a[0] + a[1] * z + a[2] * z * z))
    return 20 * math.log10(gain)


def expected_lufs(peak_dbfs: float, freq: float, channels: int, rate: float) -> float:
    """BS.1770 loudness of a steady sine: -0.691 + 10·log10(Σ channel mean squares) + K-weighting gain."""
    mean_square = (10 ** (peak_dbfs / 20)) ** 2 / 2
    return -0.691 + 10 * math.log10(channels * mean_square) + k_weighting_db(freq, rate)


def loudness(path, spec: str = "loudness-ebur128") -> dict:
    """The loudness results for one file."""
    return analyze_file(str(path), [spec])["results"][spec]["results"]


def test_available_and_names():
    """The package reports Essentia as available and names models as the service returns them."""
    assert available()
    assert LOCAL_MODELS == ("key", "bpm_degara", "loudness_ebur128")


def test_click_track_reads_120_bpm(tmp_path):
    """A 120 BPM click track reads 120 ± 1 BPM, with beats half a second apart, in seconds."""
    out = analyze_file(str(write_wav(tmp_path / "click.wav", click_track(120, 20))), ["bpm_degara"])
    assert out["errors"] == {}
    result = out["results"]["bpm_degara"]
    assert result["model_name"] == "bpm_degara" and result["model_version"] == "1"
    assert abs(result["results"]["bpm"] - 120) <= 1, result["results"]["bpm"]
    beats = result["results"]["beat_positions"]
    assert 35 <= len(beats) <= 41 and 0 <= beats[0] < 1 and beats[-1] < 20
    assert abs(float(np.median(np.diff(beats))) - 0.5) < 0.02


@pytest.mark.parametrize(("tonic", "scale"), [("C", "major"), ("A", "minor"), ("Eb", "major")])
def test_chord_progression_reads_its_key(tmp_path, tonic, scale):
    """I-IV-V-I in a key reads as that key, shaped like the service's key results (one-element lists)."""
    music = chord_progression(tonic=tonic, scale=scale)
    out = analyze_file(str(write_wav(tmp_path / "chords.wav", music)), ["key:1"])
    result = out["results"]["key:1"]
    assert result["model_name"] == "key"
    assert result["results"]["key"] == [tonic] and result["results"]["scale"] == [scale]
    assert len(result["results"]["strength"]) == 1 and 0 < result["results"]["strength"][0] <= 1


def test_stereo_sine_integrated_loudness(tmp_path):
    """A stereo 997 Hz sine peaking at -20 dBFS reads its BS.1770 loudness (≈ -20.0 LUFS) within 0.1 LU."""
    expected = expected_lufs(-20.0, 997, channels=2, rate=44100)
    assert abs(expected + 20.0) < 0.05  # the calibration point of the standard
    result = analyze_file(str(write_wav(tmp_path / "sine.wav", sine(997, 10, -20.0, channels=2))), ALL[2:])
    assert result["results"]["loudness-ebur128"]["model_name"] == "loudness_ebur128"
    r = result["results"]["loudness-ebur128"]["results"]
    assert abs(r["integratedLoudness"][0] - expected) < 0.1, (r["integratedLoudness"], expected)
    assert len(r["loudnessRange"]) == 1 and r["loudnessRange"][0] < 0.5
    assert len(r["momentaryLoudness"]) == 1 and 90 <= len(r["momentaryLoudness"][0]) <= 101  # 10 Hz over 10 s
    assert len(r["shortTermLoudness"]) == 1 and 65 <= len(r["shortTermLoudness"][0]) <= 101


def test_mono_is_measured_as_one_channel(tmp_path):
    """The same sine in a mono file reads 10·log10(2) ≈ 3.01 dB lower than in stereo: the channel is not doubled."""
    m = loudness(write_wav(tmp_path / "mono.wav", sine(997, 10, -20.0)))["integratedLoudness"][0]
    s = loudness(write_wav(tmp_path / "stereo.wav", sine(997, 10, -20.0, channels=2)))["integratedLoudness"][0]
    assert abs((s - m) - 10 * math.log10(2)) < 0.05
    assert abs(m - expected_lufs(-20.0, 997, channels=1, rate=44100)) < 0.1


def test_48k_file_is_resampled_for_key_and_tempo(tmp_path):
    """A 48 kHz file reads the same key and tempo (resampled to 44.1 kHz) and its loudness at its own rate."""
    rate = 48000
    music = 0.6 * chord_progression(rate=rate) + 0.4 * click_track(120, 24, rate=rate)
    path = write_wav(tmp_path / "48k.wav", np.stack([music, music], axis=1), rate)
    out = analyze_file(str(path), ["key", "bpm_degara", "loudness_ebur128", "loudness-ebur128"])
    assert out["errors"] == {}
    assert out["results"]["key"]["results"]["key"] == ["C"]
    assert abs(out["results"]["bpm_degara"]["results"]["bpm"] - 120) <= 1
    both = out["results"]["loudness_ebur128"], out["results"]["loudness-ebur128"]
    assert both[0] == both[1] and both[0]["model_name"] == "loudness_ebur128"
    tone = loudness(write_wav(tmp_path / "tone48.wav", sine(997, 5, -20.0, rate=rate, channels=2), rate))
    assert abs(tone["integratedLoudness"][0] - expected_lufs(-20.0, 997, 2, rate)) < 0.1


def test_silence_and_short_clips_are_guarded(tmp_path):
    """Digital silence fails every model with a reason; a 1 s tone fails tempo but keeps key and loudness."""
    quiet = analyze_file(str(write_wav(tmp_path / "silence.wav", silence(5))), ALL)
    assert quiet["results"] == {}
    assert all(quiet["errors"][m].startswith("digital silence: no ") for m in ALL), quiet["errors"]
    short = analyze_file(str(write_wav(tmp_path / "short.wav", sine(440, 1, -12, channels=2))), ALL)
    assert re.match(r"(no beat was found|only \d beats? found) in 1\.0 s of audio", short["errors"]["bpm_degara"])
    assert set(short["results"]) == {"key", "loudness-ebur128"}
    assert short["results"]["key"]["results"]["key"] == ["A"]
    blip = analyze_file(str(write_wav(tmp_path / "blip.wav", sine(440, 0.2, -12))), ["loudness-ebur128"])
    assert blip["errors"]["loudness-ebur128"].startswith("too short for loudness")


def test_unreadable_and_many_channels(tmp_path):
    """Bytes the decoder cannot read, and a 6-channel file, give every model an error naming the cause."""
    junk = tmp_path / "junk.wav"
    junk.write_bytes(np.random.default_rng(1).bytes(50_000))
    out = analyze_file(str(junk), ALL)
    assert out["results"] == {} and set(out["errors"]) == set(ALL)
    assert all("cannot read this file" in e and "Invalid data" in e for e in out["errors"].values())
    surround = write_wav(tmp_path / "six.wav", sine(440, 2, -12, channels=6))
    out = analyze_file(str(surround), ALL)
    assert out["results"] == {} and all("6 channels" in out["errors"][m] for m in ALL)


def test_unknown_model_fails_alone(tmp_path):
    """A model the local backend lacks (or another version) is an error naming what is available; others succeed."""
    path = write_wav(tmp_path / "tone.wav", sine(440, 2, -12))
    out = analyze_file(str(path), ["key", "mood_happy", "key:2"])
    assert set(out["results"]) == {"key"} and set(out["errors"]) == {"mood_happy", "key:2"}
    assert out["errors"]["mood_happy"] == (
        "model mood_happy is not available in the local backend; available: key, bpm_degara, loudness-ebur128"
    )
    assert out["essentia_version"]


def test_files_over_the_limit_are_refused(tmp_path):
    """A file longer than max_seconds is refused before decoding."""
    path = write_wav(tmp_path / "long.wav", sine(440, 3, -12))
    out = analyze_file(str(path), ALL, max_seconds=2)
    assert out["results"] == {} and all("over the configured local limit" in out["errors"][m] for m in ALL)


def test_pool_runs_files_concurrently(tmp_path):
    """Two files go through two worker processes off the event loop, each with its own results."""
    a = write_wav(tmp_path / "a.wav", sine(997, 3, -12, channels=2))
    b = write_wav(tmp_path / "b.wav", sine(997, 3, -24, channels=2))

    async def go():
        async with LocalPool(workers=2) as pool:
            answers = await asyncio.gather(pool.analyze(str(a), ALL[2:]), pool.analyze(str(b), ALL[2:]))
            return answers, pool.worker_pids()

    (ra, rb), pids = asyncio.run(go())
    assert len(set(pids)) == 2 and os.getpid() not in pids
    la = ra["results"]["loudness-ebur128"]["results"]["integratedLoudness"][0]
    lb = rb["results"]["loudness-ebur128"]["results"]["integratedLoudness"][0]
    assert abs((la - lb) - 12) < 0.1


def test_worker_crash_is_an_error_and_the_pool_recovers(tmp_path):
    """A worker killed mid-file fails that file's models with a clear error; the next file runs in a new pool."""
    path = write_wav(tmp_path / "tone.wav", sine(997, 3, -12, channels=2))

    async def go():
        async with LocalPool(workers=1) as pool:

            def kill() -> None:
                os.kill(wait_for(pool.worker_pids, what="a worker process")[0], signal.SIGKILL)

            killer = threading.Thread(target=kill)
            killer.start()
            crashed = await pool.analyze(str(path), ALL)
            killer.join()
            again = await pool.analyze(str(path), ALL[2:])
            return crashed, again

    crashed, again = asyncio.run(go())
    assert crashed["results"] == {} and all("worker died" in crashed["errors"][m] for m in ALL)
    assert again["errors"] == {} and "loudness-ebur128" in again["results"]


def test_daemon_without_key_uses_local_analysis(tmp_path, run_daemon):
    """No API key and the extra installed: `auto` picks local, and the sidecar says so, with real results."""
    import json

    from tests.conftest import query, wait_for
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
    write_wav(tmp_path / "quiet.wav", silence(3)).rename(inbox / "quiet.wav")
    sidecar = inbox / "chords.wav.analysis.json"
    wait_for(sidecar.exists, timeout=60)
    wait_for((inbox / "quiet.wav.analysis.json").exists, timeout=60)
    d.stop()
    doc = json.loads(sidecar.read_text())
    assert doc["backend"]["name"] == "local" and doc["backend"]["essentia_version"]
    assert doc["models"]["key"]["results"]["key"] == ["C"]
    assert set(doc["models"]) == {"key", "bpm_degara", "loudness_ebur128"}
    # Silence: a sidecar at once, each model's error named, no retry (the answer cannot change).
    quiet = json.loads((inbox / "quiet.wav.analysis.json").read_text())
    assert quiet["complete"] is False and quiet["models"] == {}
    assert {e["model"] for e in quiet["errors"]} == {"key", "bpm_degara", "loudness-ebur128"}
    assert all("digital silence" in e["message"] for e in quiet["errors"])
    assert query(
        tmp_path, "SELECT state, attempts FROM jobs j JOIN files f ON f.id=j.file_id WHERE f.path LIKE '%quiet.wav'"
    ) == ("failed", 0)


@pytest.mark.bill_exempt("the emulator through the analysis client alone: no store, no ledger")
@pytest.mark.usefixtures("gate_stand_in")
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
    from watcher.app import App
    from watcher.backends import choose_backend
    from watcher.config import AnalysisConfig, Settings
    from watcher.errors import ConfigError

    assert choose_backend(AnalysisConfig(api_key=SecretStr("k-123456")))[0] == "remote"
    with capture_logs() as logs:
        app = App.build(Settings(state_dir=tmp_path / "s"))
    asyncio.run(app.aclose())
    (line,) = [e for e in logs if e["event"] == "analysis.backend"]
    assert line["backend"] == "local" and "no API key" in line["reason"]
    monkeypatch.setattr(watcher.local, "available", lambda: False)
    with pytest.raises(ConfigError, match=r'pip install "watcher-audio\[local\]"'):
        choose_backend(AnalysisConfig())
    with pytest.raises(ConfigError, match="needs the local extra"):
        choose_backend(AnalysisConfig(backend="local"))


@pytest.mark.parametrize("bpm", [100, 128])
def test_tempo_of_a_five_second_clip(tmp_path, bpm):
    """A 5.3 s click pattern (accent every fourth beat) gets its tempo within 2 BPM: no fixed length guard."""
    out = analyze_file(str(write_wav(tmp_path / "short.wav", click_track(bpm, 5.3))), ["bpm_degara"])
    assert out["errors"] == {}
    result = out["results"]["bpm_degara"]["results"]
    assert abs(result["bpm"] - bpm) <= 2, result["bpm"]
    assert len(result["beat_positions"]) >= 4


@pytest.mark.parametrize(
    ("seconds", "reason"),
    [(1.0, r"no beat was found in 1\.0 s of audio \(the tempo model gave 0 BPM\)"),
     (2.0, r"only [0-3] beats? found in 2\.0 s of audio; a tempo needs at least 4")],
)  # fmt: skip
def test_degenerate_tempo_is_an_error_naming_why(tmp_path, seconds, reason):
    """Clips too short for a tempo fail with the reason (0 BPM, or too few beats); loudness is still measured."""
    clip = write_wav(tmp_path / "clip.wav", click_track(120, seconds))
    out = analyze_file(str(clip), ["bpm_degara", "loudness-ebur128"])
    assert re.fullmatch(reason, out["errors"]["bpm_degara"]), out["errors"]
    assert set(out["results"]) == {"loudness-ebur128"}
