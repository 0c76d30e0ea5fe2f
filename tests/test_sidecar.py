"""The sidecar writer: merges, never writes for a revision that is gone, and keeps no per-path state for long."""

from __future__ import annotations

import asyncio
import gc
import json
import os
from pathlib import Path

from tests.conftest import write_tone
from watcher.audiofile import signature
from watcher.pipelines import sidecar
from watcher.pipelines.sidecar import write_sidecar
from watcher.store import FileRevision


def revision_of(path: Path) -> FileRevision:
    sig = signature(path)
    return FileRevision(1, str(path.parent), str(path), path.name, sig.size, sig.mtime_ns, sig.inode, None, True)


def test_per_path_locks_do_not_pile_up(tmp_path):
    """Writing sidecars for many files leaves no lock behind once the writes are over."""

    async def many() -> None:
        await asyncio.gather(*(write_sidecar(tmp_path / f"{n}.json", "ab", {"n": n}) for n in range(200)))

    asyncio.run(many())
    gc.collect()
    assert len(sidecar._locks) == 0
    assert json.loads((tmp_path / "7.json").read_text())["n"] == 7


def test_nothing_is_written_for_a_revision_that_changed_or_a_dead_job(tmp_path):
    """A late result (the audio changed on disk, or the job was superseded) writes nothing."""
    audio = write_tone(tmp_path / "a.wav", 0.2)
    old = revision_of(audio)
    target = tmp_path / "a.wav.analysis.json"

    async def dead() -> bool:
        return False

    assert not asyncio.run(write_sidecar(target, "ab", {"x": 1}, revision=old, live=dead))
    write_tone(tmp_path / "b.wav", 0.3, freq=900)
    os.replace(tmp_path / "b.wav", audio)  # a newer revision is on disk now
    assert not asyncio.run(write_sidecar(target, "ab", {"x": 1}, revision=old))
    assert not target.exists()
    assert asyncio.run(write_sidecar(target, "cd", {"x": 2}, revision=revision_of(audio)))
    assert json.loads(target.read_text())["x"] == 2
