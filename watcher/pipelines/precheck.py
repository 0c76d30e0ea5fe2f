"""The check every pipeline makes before paid work, written once: is the file still the revision that settled,
is it audio, what is its content hash and duration. All file system work runs in one worker-thread hop.

The hash is needed before any paid request (the gate is keyed by it), so it is computed on this first read.
A small file (``audiofile.SMALL``) is read whole here, once: its hash, format and duration come from that
read, and its request body is sent from it. A larger file is hashed here and streamed again from disk (the
page cache, when it is fresh), checked against its settled signature before and after.
"""

from __future__ import annotations

import asyncio
import io
import os
from dataclasses import dataclass
from typing import Protocol

from watcher.audiofile import SMALL, Signature, audio_format, check_audio, read_settled
from watcher.errors import FileChanged, RetryLater
from watcher.media import audio_info, charged_seconds
from watcher.pipelines.base import StepResult
from watcher.store import Job, State


@dataclass(frozen=True)
class Checked:
    """A revision ready for paid work: its content hash, what its header says, and its content when small."""

    sha256: str
    duration: float | None
    channels: int | None
    content: bytes | None = None  # the whole settled revision when it is small: its body needs no second read
    charged: float = 0.0  # the audio seconds a paid request for it is charged (see media.charged_seconds)
    estimated: bool = False  # ``charged`` is an upper bound: the headers give no duration

    @property
    def seconds(self) -> float:
        """The audio seconds the ledger charges for this file: its duration, or an upper bound (never 0)."""
        return self.charged


class PrecheckStore(Protocol):
    """The part of the (asynchronous) store a precheck uses."""

    async def set_sha256(self, file_id: int, sha256: str) -> None: ...


def _look(job: Job, sha256: str | None) -> StepResult | Checked:
    """In a worker thread: the file's state, or what paid work needs (hashing it unless ``sha256`` is known)."""
    revision = job.file
    settled = Signature(revision.size, revision.mtime_ns, revision.inode)
    if not os.path.isdir(revision.folder):
        raise RetryLater(f"the watched folder {revision.folder} is not available (unmounted share?)")
    try:
        current = Signature.of(os.stat(revision.path))
        if current != settled:
            raise FileChanged("the file changed after it settled; its new revision is handled anew")
        if revision.size == 0:
            return StepResult(State.SKIPPED, note="the file is empty (0 bytes); a later write makes it a new revision")
        if revision.size <= SMALL:
            digest, content = read_settled(revision.path, settled, hashed=sha256 is None)
            assert content is not None
            container = audio_format(content)
            header = io.BytesIO(content)
            header.name = revision.path  # mutagen guesses some formats from the name
            info = audio_info(revision.path, fileobj=header, container=container)
            charged, estimated = charged_seconds(info, revision.size, container)
            return Checked(sha256 or digest, info.duration, info.channels, content, charged, estimated)
        container = check_audio(revision.path)
        if sha256 is None:
            sha256, _ = read_settled(revision.path, settled)
    except FileNotFoundError:
        return StepResult(State.GONE, note=f"the file was deleted before {job.pipeline} started")
    info = audio_info(revision.path)
    charged, estimated = charged_seconds(info, revision.size, container)
    return Checked(sha256, info.duration, info.channels, None, charged, estimated)


async def precheck(store: PrecheckStore, job: Job) -> StepResult | Checked:
    """Check the job's revision; a final StepResult (gone, skipped) or what paid work needs to know.

    Raises FileChanged (a newer revision is coming), BadInput (not audio) or RetryLater (folder unavailable).
    The hash is computed once per revision and shared by every pipeline through the store; the job's data
    takes it too, written with the job's next commit or release (the step's one transaction).
    """
    revision = job.file
    known = revision.sha256 or job.data.get("sha256")
    checked = await asyncio.to_thread(_look, job, known)
    if isinstance(checked, StepResult):
        return checked
    if known is None:
        await store.set_sha256(revision.id, checked.sha256)
    job.data.update(
        sha256=checked.sha256,
        duration=checked.duration,
        channels=checked.channels,
        charged=checked.charged,
        estimated=checked.estimated,
    )
    return checked
