"""After a file version's pipelines all ended: move the source (and its sidecar) into the folder's done or
failed folder, when one is configured. Default: leave it where it is."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import structlog

from watcher.config import FolderConfig, SidecarConfig
from watcher.stages.sidecar import sidecar_path
from watcher.store import TERMINAL, Job

log = structlog.get_logger("watcher.finish")


class JobsOf(Protocol):
    def jobs_of_file(self, file_id: int) -> list[Job]: ...


class SourceMover:
    """Moves a finished source into ``done_dir`` (nothing failed) or ``failed_dir`` (something failed)."""

    def __init__(self, store: JobsOf, folders: Mapping[str, FolderConfig], sidecar: SidecarConfig) -> None:
        self.store = store
        self.folders = dict(folders)
        self.sidecar = sidecar

    def after(self, job: Job) -> Path | None:
        """Called when a job reached a terminal stage; returns where the source went, if it moved."""
        folder = self.folders.get(job.file.folder)
        if folder is None or (folder.done_dir is None and folder.failed_dir is None):
            return None
        jobs = self.store.jobs_of_file(job.file.id)
        if not job.file.current or any(j.stage not in TERMINAL for j in jobs):
            return None
        if any(j.stage in ("superseded", "gone") for j in jobs):
            return None
        failed = any(j.stage == "failed" for j in jobs)
        destination = folder.failed_dir if failed else folder.done_dir
        if destination is None:
            return None
        source = Path(job.file.path)
        target = destination / job.file.rel_path
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target = target.with_name(f"{target.stem}.{job.file.id}{target.suffix}")
            side = sidecar_path(source, folder.path, self.sidecar)
            shutil.move(source, target)
            if self.sidecar.directory is None and side.exists():
                shutil.move(side, target.with_name(target.name + self.sidecar.suffix))
        except OSError as exc:
            log.error(
                "finish.move_failed",
                path=str(source),
                target=str(target),
                error=exc.strerror,
                next="the file stays where it is",
            )
            return None
        log.info("finish.moved", path=str(source), target=str(target), outcome="failed" if failed else "done")
        return target


def inside(child: Path, parent: Path) -> bool:
    """True when ``child`` is ``parent`` or below it."""
    try:
        return os.path.commonpath([child, parent]) == str(parent)
    except ValueError:
        return False
