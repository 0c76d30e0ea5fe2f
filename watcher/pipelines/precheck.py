"""The check every pipeline makes before paid work, written once: is the file still the version that settled,
is it audio, what is its content hash and duration. All file system work runs in a worker thread."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any, Protocol

from watcher.audiofile import Signature, check_audio, hash_file
from watcher.errors import FileChanged, RetryLater
from watcher.media import audio_info
from watcher.pipelines.base import StepResult
from watcher.store import Job


@dataclass(frozen=True)
class Checked:
    """A file version ready for paid work: its content hash and what its header says."""

    sha256: str
    duration: float | None
    channels: int | None

    @property
    def seconds(self) -> float:
        """The audio seconds the ledger charges for this file (0 when the header gives no duration)."""
        return self.duration or 0.0


class PrecheckStore(Protocol):
    def set_sha256(self, file_id: int, sha256: str) -> None: ...

    def commit(self, job: Job, *, step: str | None = None, **data: Any) -> None: ...


def _look(job: Job, known: str | None) -> StepResult | tuple[str, float | None, int | None, str]:
    """In a worker thread: the file's state, or (format, duration, channels, sha256: ``known``, else hashed now).

    One thread hop for the whole look, hash included: it is on the way from a settled file to its request.
    """
    version = job.file
    if not os.path.isdir(version.folder):
        raise RetryLater(f"the watched folder {version.folder} is not available (unmounted share?)")
    try:
        current = Signature.of(os.stat(version.path))
        if current != Signature(version.size, version.mtime_ns, version.inode):
            raise FileChanged("the file changed after it settled; its new version is handled anew")
        if version.size == 0:
            return StepResult("skipped", note="the file is empty (0 bytes); a later write makes it a new version")
        fmt = check_audio(version.path)
    except FileNotFoundError:
        return StepResult("gone", note=f"the file was deleted before {job.pipeline} started")
    info = audio_info(version.path)
    expected = Signature(version.size, version.mtime_ns, version.inode)
    return fmt, info.duration, info.channels, known or hash_file(version.path, expected)


async def precheck(store: PrecheckStore, job: Job) -> StepResult | Checked:
    """Check the job's file version; a final StepResult (gone, skipped) or what paid work needs to know.

    Raises FileChanged (a newer version is coming), BadInput (not audio) or RetryLater (folder unavailable).
    The hash is computed once per version and shared by every pipeline through the store.
    """
    version = job.file
    known: str | None = version.sha256 or job.data.get("sha256")
    looked = await asyncio.to_thread(_look, job, known)
    if isinstance(looked, StepResult):
        return looked
    _, duration, channels, sha256 = looked
    if known is None:
        store.set_sha256(version.id, sha256)
    if job.data.get("sha256") != sha256 or job.data.get("duration") != duration:
        store.commit(job, sha256=sha256, duration=duration, channels=channels)
    return Checked(sha256, duration, channels)
