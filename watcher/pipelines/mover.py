"""After a revision's pipelines all ended: move the source (and its sidecar) into the folder's done or
failed folder, when one is configured. Default: leave it where it is.

The mover moves exactly the revision that finished, or nothing: the file on disk must still have the finished
revision's signature, and the sidecar must describe its content. Moves run in a worker thread, one at a time.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import structlog

from watcher.audiofile import Signature
from watcher.config import FolderConfig, SidecarConfig
from watcher.fsutil import move_file, read_json_object
from watcher.names import display
from watcher.pipelines.sidecar import sidecar_path
from watcher.store import TERMINAL, Job, State

log = structlog.get_logger("watcher.finish")


class JobsOf(Protocol):
    def jobs_of_file(self, file_id: int) -> list[Job]: ...


class SourceMover:
    """Moves a finished source into ``done_dir`` (nothing failed) or ``failed_dir`` (something failed)."""

    def __init__(self, store: JobsOf, folders: Mapping[str, FolderConfig], sidecar: SidecarConfig) -> None:
        self.store = store
        self.folders = dict(folders)
        self.sidecar = sidecar
        self._tasks: set[asyncio.Task[Path | None]] = set()
        self._one_at_a_time = asyncio.Lock()

    def schedule(self, job: Job) -> None:
        """Consider moving ``job``'s file off the event loop (a cross-device move is a full copy)."""
        folder = self.folders.get(job.file.folder)
        if folder is None or (folder.done_dir is None and folder.failed_dir is None):
            return

        async def move() -> Path | None:
            async with self._one_at_a_time:
                return await asyncio.to_thread(self.after, job)

        task = asyncio.ensure_future(move())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        """Let moves under way finish (at shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=30)

    def after(self, job: Job) -> Path | None:
        """Called when a job ended (a final state); returns where the source went, if it moved."""
        folder = self.folders.get(job.file.folder)
        if folder is None or (folder.done_dir is None and folder.failed_dir is None):
            return None
        jobs = self.store.jobs_of_file(job.file.id)
        if not job.file.current or any(j.state not in TERMINAL for j in jobs):
            return None
        if any(j.state in (State.SUPERSEDED, State.GONE, State.SKIPPED) for j in jobs):  # only what was processed moves
            return None
        failed = any(j.state == State.FAILED for j in jobs)
        destination = folder.failed_dir if failed else folder.done_dir
        if destination is None:
            return None
        source = Path(job.file.path)
        target = destination / job.file.rel_path
        side = sidecar_path(source, folder.path, self.sidecar)
        why = self._not_this_revision(job, source, side)
        if why:
            log.warning("finish.not_moved", path=display(source), reason=why, next="the file stays where it is")
            return None
        try:
            target = move_file(source, target)  # crash-safe across devices; never over an existing file
            if self.sidecar.directory is None and side.exists():
                move_file(side, target.with_name(target.name + self.sidecar.suffix))
        except OSError as exc:
            log.error(
                "finish.move_failed",
                path=display(source),
                target=display(target),
                error=exc.strerror,
                next="the file stays where it is",
            )
            return None
        log.info("finish.moved", path=display(source), target=display(target), outcome="failed" if failed else "done")
        return target

    def _not_this_revision(self, job: Job, source: Path, side: Path) -> str | None:
        """Why the file on disk is not the revision that finished (then nothing moves), or None."""
        revision = job.file
        try:
            now = Signature.of(os.stat(source))
        except OSError as exc:
            return f"the file cannot be read ({exc.strerror})"
        if now != Signature(revision.size, revision.mtime_ns, revision.inode):
            return "the file changed after this revision finished; its new revision is handled on its own"
        sha256 = revision.sha256 or job.data.get("sha256")
        if self.sidecar.directory is None and side.exists() and sha256:
            described = (read_json_object(side) or {}).get("source")
            if not isinstance(described, dict) or described.get("sha256") != sha256:
                return "the sidecar beside it describes other content"
        return None
