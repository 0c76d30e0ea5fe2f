"""`watcher scan --dry-run`: per-file and total estimates from real files, with nothing sent or written."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.conftest import Emulator, make_settings, write_tone
from watcher.config import DEFAULT_MODELS, ArchiveConfig, FolderConfig, Settings
from watcher.dryrun import ANALYSIS, PROCESSING, dry_run


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (files and folders) with its size and mtime."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def archive_settings(tmp_path: Path, inbox: Path, url: str, **archive: object) -> Settings:
    base = make_settings(tmp_path, inbox, url)
    cfg = ArchiveConfig(enabled=True, base_url=url, api_key="k", output_dir=inbox / "out", **archive)
    return base.model_copy(update={"archive": cfg})


def test_dry_run_sends_nothing_writes_nothing_and_counts(tmp_path: Path, inbox: Path, emulator: Emulator) -> None:
    """Three files (one analysed before), a temp file and our own output folder: estimates and totals."""
    a = write_tone(inbox / "a.wav", 3.0)
    b = write_tone(inbox / "sub" / "b.wav", 1.5)
    known = write_tone(inbox / "known.wav", 2.0, freq=220)
    (inbox / "c.wav.part").write_bytes(b"being copied")
    (inbox / "notes.txt").write_text("not audio")
    write_tone(inbox / "out" / "a" / "a.original.wav", 3.0)  # a delivery: never work
    (inbox / "fake.wav").write_text("text named .wav\n")
    (inbox / "cut.wav").write_bytes(a.read_bytes()[:30])  # a WAV whose header is cut short
    settings = archive_settings(tmp_path, inbox, emulator.url, versions=("original", "mastered", "stems"))
    before = tree_state(tmp_path)
    asked: list[str] = []

    def cached(sha256: str) -> set[str]:
        asked.append(sha256)
        return {"key", "bpm_degara", "loudness-ebur128"} if sha256 == sha(known) else {"key"}

    def answered(sha256: str) -> set[str]:
        return {"upload", "master"} if sha256 == sha(known) else set()

    report = dry_run(settings, [inbox], cached_models=cached, answered_operations=answered)

    assert emulator.api.requests == [] and emulator.storage.requests == []
    assert tree_state(tmp_path) == before
    by_name = {Path(f.path).name: f for f in report.files}
    assert sorted(by_name) == ["a.wav", "b.wav", "cut.wav", "known.wav"]
    assert sorted(asked) == sorted(sha(inbox / n) for n in ("a.wav", "sub/b.wav", "cut.wav", "known.wav"))
    assert [(Path(p).name, why.split(":")[0]) for p, why in report.skipped] == [
        ("fake.wav", "a scan would refuse it, sending nothing")
    ]
    fa = by_name["a.wav"]
    assert fa.sha256 == sha(a) and fa.size == a.stat().st_size and abs(fa.seconds - 3.0) < 0.01
    assert fa.models == ("bpm_degara", "loudness-ebur128") and fa.cached_models == ("key",)
    assert fa.versions == ("original", "mastered", "original_stems")
    assert fa.calls == ("upload", "master", "stems:original")
    fk = by_name["known.wav"]
    assert fk.models == () and fk.calls == ("stems:original",)
    ff = by_name["cut.wav"]
    # no duration in its headers: an upper bound (its size at 8-bit samples of the header's rate), never 0
    assert ff.seconds is not None and ff.seconds > 0
    assert ff.duration_note.startswith("estimated: at most that (the headers of ")

    analysis, processing = report.totals[ANALYSIS], report.totals[PROCESSING]
    assert analysis.calls == 3 and analysis.unknown_duration == 1  # a, b, cut: one stream each
    assert abs(analysis.seconds - 4.5 - ff.seconds) < 0.01
    assert processing.by_call == {"upload": 3, "master": 3, "stems:original": 4}
    assert processing.calls == 10 and processing.unknown_duration == 3
    assert abs(processing.seconds - (3 * 3.0 + 3 * 1.5 + 2.0 + 3 * ff.seconds)) < 0.01

    text = report.render()
    assert "fake.wav: a scan would refuse it, sending nothing: the content is not audio" in text
    assert "Dry run: 4 files; nothing was sent and nothing was written." in text
    assert f"{a}  (3.0 s)" in text and "analysis: would ask bpm_degara, loudness-ebur128; already stored: key" in text
    assert "estimated: at most that (the headers of" in text
    assert "processing (Neural Analog): 10 paid calls, 0.3 min of audio (upload 3, master 3, stems:original 4)" in text
    assert "3 calls on audio of unknown duration, counted at an upper bound (estimated)" in text
    assert b.name in text and "c.wav.part" not in text and "a.original.wav" not in text


def test_paths_inside_a_configured_folder_use_its_options(tmp_path: Path) -> None:
    """A subfolder or a file of a configured folder is filtered with that folder's include patterns."""
    inbox = tmp_path / "inbox"
    write_tone(inbox / "sub" / "x.wav", 0.5)
    write_tone(inbox / "sub" / "y.flac.wav", 0.5)
    (inbox / "sub" / "z.aiff").write_bytes(b"")
    settings = Settings(
        state_dir=tmp_path / "state",
        folders=(FolderConfig(path=inbox, include=("*.wav", "*.aiff"), exclude=("y.*",)),),
    )
    report = dry_run(
        settings,
        [inbox / "sub", inbox / "sub" / "y.flac.wav", tmp_path / "missing.wav"],
        cached_models=lambda _sha: set(),
        answered_operations=lambda _sha: set(),
    )
    assert [Path(f.path).name for f in report.files] == ["x.wav"]
    assert report.files[0].versions == () and report.files[0].calls == ()  # archive off
    reasons = {Path(p).name: why for p, why in report.skipped}
    assert reasons == {
        "z.aiff": "empty; a scan skips it",
        "y.flac.wav": "not work for its folder (include/exclude)",
        "missing.wav": "does not exist",
    }
    assert os.listdir(tmp_path) == ["inbox"]


def test_identical_copies_are_counted_once(tmp_path: Path, inbox: Path) -> None:
    """Two copies of one take in a run: the gate pays once, so the estimate counts them once and says so."""
    first = write_tone(inbox / "a take.wav", 2.0)
    copy = inbox / "z copy.wav"
    copy.write_bytes(first.read_bytes())
    settings = archive_settings(tmp_path, inbox, "http://127.0.0.1:9", versions=("original", "mastered"))
    asked: list[str] = []
    report = dry_run(
        settings,
        [inbox],
        cached_models=lambda sha256: asked.append(sha256) or set(),
        answered_operations=lambda _sha: set(),
    )
    paid, dup = sorted(report.files, key=lambda f: f.same_as is not None)  # the walk's order is the folder's
    assert {paid.path, dup.path} == {str(first), str(copy)}
    assert paid.same_as is None and paid.calls == ("upload", "master") and paid.models == DEFAULT_MODELS
    assert dup.same_as == paid.path and dup.models == () and dup.calls == () and dup.cached_models == ()
    assert asked == [sha(first)]  # the store is asked once per content
    assert report.totals[ANALYSIS].calls == 1 and abs(report.totals[ANALYSIS].seconds - 2.0) < 0.01
    assert report.totals[PROCESSING].by_call == {"upload": 1, "master": 1}
    assert f"same content as {paid.path}: paid once, for both" in report.render()
