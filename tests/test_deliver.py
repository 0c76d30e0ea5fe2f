"""Delivery against the processing emulator: sizes bounded by the source, names from the network made safe."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.conftest import NA_KEY, NA_POLICY, Service, body, write_silent_wav, write_tone
from watcher import fsutil
from watcher.config import ArchiveConfig
from watcher.pipelines.deliver import Deliverer
from watcher.safezip import BadArchive, TooLarge
from watcher.services.neuralanalog import NeuralAnalogClient
from watcher.store import Job
from watcher.store.models import FileRevision

pytestmark = [
    pytest.mark.bill_exempt("delivery from objects uploaded by the client alone: no gate, no ledger"),
    pytest.mark.usefixtures("gate_stand_in"),
]


def make_job(source: Path, inbox: Path, sha256: str, **data: Any) -> Job:
    """A claimed archive job for ``source`` (inside ``inbox``), with ``data`` as the pipeline left it."""
    st = source.stat()
    file = FileRevision(1, str(inbox), str(source), source.relative_to(inbox).as_posix(), st.st_size,
                        st.st_mtime_ns, st.st_ino, sha256, True)  # fmt: skip
    return Job(7, "archive", "fetch", "pending", 1, {"sha256": sha256, **data}, file)


def deliver(na: Service, cfg: ArchiveConfig, out: Path, job: Job, versions: list[str], ids: dict[str, str]) -> Path:
    async def go() -> Path:
        async with NeuralAnalogClient(na.api.url, NA_KEY, NA_POLICY) as client:
            return await Deliverer(client, cfg, lambda _job: out).deliver(job, versions, ids)

    return asyncio.run(go())


def processed(na: Service, source: Path, *, stems: bool = False) -> dict[str, str]:
    """Upload and master ``source`` (and split its stems) on the emulator; the service IDs."""

    async def go() -> dict[str, str]:
        async with NeuralAnalogClient(na.api.url, NA_KEY, NA_POLICY) as client:
            audio_id = await client.upload(body(source))
            ids = {"audio": audio_id, "mastered": await client.master(audio_id, {})}
            if stems:
                ids["stems:original"] = await client.create_stems("audio_id", audio_id, {"preset": "4_tracks"})
            return ids

    return asyncio.run(go())


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


def test_bomb_in_a_zip_for_a_three_second_source_is_refused(na: Service, tmp_path: Path, inbox: Path) -> None:
    """64 MiB of zeros next to a 3 s source's versions: BadArchive naming the entry, bound and duration."""
    na.emu.faults.polls_needed, na.emu.faults.zip_attack = 0, "oversized"
    source = write_tone(inbox / "take.wav", 3.0)
    ids = processed(na, source)
    job = make_job(source, inbox, "a" * 64, duration=3.0, channels=2)
    out = tmp_path / "out"
    with pytest.raises(BadArchive) as err:
        deliver(na, ArchiveConfig(), out, job, ["original", "mastered"], ids)
    message = str(err.value)
    for part in ("'huge.wav'", str(64 << 20), "-byte bound for one file", "3.0 s", "2-channel"):
        assert part in message, (part, message)
    assert not out.exists() or list(out.iterdir()) == []


def test_unknown_duration_falls_back_to_the_cap_and_says_so(na: Service, tmp_path: Path, inbox: Path) -> None:
    """No duration in the job: the configured cap applies, the log says so, and the delivery is made."""
    na.emu.faults.polls_needed = 0
    source = write_tone(inbox / "take.wav", 0.5)
    ids = processed(na, source)
    job = make_job(source, inbox, "b" * 64, duration=None, channels=None)
    with structlog.testing.capture_logs() as logs:
        target = deliver(na, ArchiveConfig(), tmp_path / "out", job, ["original", "mastered"], ids)
    unbounded = [e for e in logs if e["event"] == "deliver.size_unbounded"]
    assert unbounded and unbounded[0]["reason"] == "the source's duration is unknown"
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["versions"] == ["mastered", "original"]


def test_single_downloads_are_bounded_by_the_source(na: Service, tmp_path: Path, inbox: Path) -> None:
    """Fetched one by one (archive queued for e-mail), a 3 MB version of a source said to last 0.1 s is refused."""
    na.emu.faults.polls_needed, na.emu.faults.email_queued = 0, 2
    source = write_silent_wav(inbox / "take.wav", 3)
    ids = processed(na, source)
    job = make_job(source, inbox, "c" * 64, duration=0.1, channels=2)
    with pytest.raises(TooLarge, match=r"announced \d+ bytes for take\.original\.wav"):
        deliver(na, ArchiveConfig(), tmp_path / "out", job, ["original"], ids)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    job = make_job(source, inbox, "c" * 64, duration=20.0, channels=2)
    target = deliver(na, ArchiveConfig(), tmp_path / "out", job, ["original"], ids)
    assert (target / "take.original.wav").read_bytes() == source.read_bytes()


def test_hostile_stem_names_land_as_safe_files_inside_the_delivery(na: Service, tmp_path: Path, inbox: Path) -> None:
    """Stem names like ``../../evil``, ``""`` or ``.hidden`` become plain files under stems/<version>/."""
    na.emu.faults.polls_needed, na.emu.faults.email_queued = 0, 1
    source = write_tone(inbox / "take.wav", 0.5)
    ids = processed(na, source, stems=True)
    split = na.emu.objects[ids["stems:original"]]
    split.stems = list(zip([s for s, _ in split.stems], ["../../evil", "", ".hidden", "-rf"], strict=True))
    job = make_job(source, inbox, "d" * 64, duration=0.5, channels=2)
    out = tmp_path / "out"
    target = deliver(na, ArchiveConfig(), out, job, ["original_stems"], ids)
    stems = sorted(p.relative_to(target).as_posix() for p in (target / "stems").rglob("*") if p.is_file())
    assert stems == [f"stems/original_stems/{n}.wav" for n in ("evil", "hidden", "original_stems-2", "rf")]
    everything = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert all(p.startswith(("inbox/", "out/take/")) for p in everything), everything


def test_delivery_follows_the_umask(na: Service, tmp_path: Path, inbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under umask 002, delivered files and the manifest are 0664 and folders 0775 (staging was private)."""
    old = os.umask(0o002)
    try:
        monkeypatch.setattr(fsutil, "UMASK", fsutil._read_umask())
        na.emu.faults.polls_needed = 0
        source = write_tone(inbox / "take.wav", 0.5)
        ids = processed(na, source, stems=True)
        job = make_job(source, inbox, "e" * 64, duration=0.5, channels=2)
        target = deliver(na, ArchiveConfig(), tmp_path / "out", job, ["original", "mastered", "original_stems"], ids)
    finally:
        os.umask(old)
    modes = {p.relative_to(target).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in target.rglob("*")}
    assert modes["manifest.json"] == 0o664 and modes["stems"] == 0o775
    assert len(modes) >= 8
    assert all(m == (0o775 if (target / p).is_dir() else 0o664) for p, m in modes.items()), modes
    assert stat.S_IMODE(target.stat().st_mode) == 0o775
