"""The wiring of everything that does work: the store, the enabled stages, their services, the runner.

Shared by `watcher run` and `watcher scan`; the daemon adds detection's lifecycle and signals on top.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from watcher.analyzers import Backend, choose_backend, make_backend
from watcher.audiofile import Signature
from watcher.config import FolderConfig, Settings, reveal, service_identity
from watcher.detect.detector import Detector
from watcher.errors import ConfigError
from watcher.runner import Outcome, Runner
from watcher.stages.analyze import AnalyzeStage
from watcher.stages.base import NullSpend, SpendObserver, Stage
from watcher.stages.finish import SourceMover, inside
from watcher.store import TERMINAL, Job, Store

log = structlog.get_logger("watcher.pipeline")
RESTART_STAGE = {"analyze": "pending", "archive": "pending"}
PAID_DRAIN_SECONDS = 2.0


def store_path(settings: Settings) -> Path:
    return settings.state_dir / "watcher.db"


class StoreSink:
    """Detection's sink: a settled file becomes a file version with one job per enabled pipeline."""

    def __init__(
        self,
        store: Store,
        stages: Sequence[Stage],
        wake: Callable[[], None],
        on_new: Callable[[str], None] = lambda folder: None,
    ) -> None:
        self.store = store
        self.jobs = [(s.kind, s.first_stage) for s in stages]
        self.wake = wake
        self.on_new = on_new

    def known(self, path: str, sig: Signature) -> bool:
        return self.store.known_version(path, sig.size, sig.mtime_ns, sig.inode)

    def ready(self, folder: FolderConfig, path: str, rel_path: str, sig: Signature) -> None:
        _, new = self.store.register_version(
            folder=str(folder.path),
            path=path,
            rel_path=rel_path,
            size=sig.size,
            mtime_ns=sig.mtime_ns,
            inode=sig.inode,
            jobs=self.jobs,
        )
        if new:
            log.info("file.settled", path=path, size=sig.size, next="queued for " + ", ".join(k for k, _ in self.jobs))
            self.on_new(str(folder.path))
            self.wake()


class Pipeline:
    """Everything that does work, built from settings."""

    def __init__(
        self,
        settings: Settings,
        folders: Sequence[FolderConfig] | None = None,
        *,
        spend: SpendObserver | None = None,
    ) -> None:
        self.settings = settings
        self.folders = {str(f.path): f for f in (folders if folders is not None else settings.folders)}
        self.store = Store(store_path(settings))
        self.spend = spend or NullSpend()
        self.closers: list[Any] = []
        self.hooks: list[Callable[[Outcome], None]] = []
        stages: list[Stage] = []
        concurrency: dict[str, int] = {}
        if settings.analysis.enabled:
            which, why = choose_backend(settings.analysis)
            log.info("analysis.backend", backend=which, reason=why, models=list(settings.analysis.models))
            backend: Backend = make_backend(settings.analysis, which)
            self.closers.append(backend)
            self.store.adopt_legacy(backend.name, backend.key)
            stages.append(
                AnalyzeStage(
                    self.store,
                    backend,
                    models=settings.analysis.models,
                    sidecar=settings.sidecar,
                    cap_minutes=settings.analysis.daily_audio_minutes,
                    spend=self.spend,
                )
            )
            concurrency["analyze"] = (
                settings.analysis.concurrency if which == "remote" else (settings.analysis.local_workers)
            )
        if settings.archive.enabled:
            stages.append(self._archive_stage())
            concurrency["archive"] = settings.archive.concurrency
        if not stages:
            raise ConfigError("nothing to do: both analysis.enabled and archive.enabled are false")
        self.stages = {s.kind: s for s in stages}
        self.mover = SourceMover(self.store, self.folders, settings.sidecar)
        self.runner = Runner(
            self.store,
            self.stages,
            concurrency=concurrency,
            retry=settings.retry,
            on_outcome=self._outcome,
            rehint=self._rehint,
        )
        self.sink = StoreSink(self.store, stages, self.runner.wake)
        self.detector: Detector | None = None

    def _archive_stage(self) -> Stage:
        from watcher.services.http import HttpPolicy
        from watcher.services.neuralanalog import NeuralAnalogClient
        from watcher.stages.archive import ArchiveStage
        from watcher.stages.deliver import Deliverer

        cfg = self.settings.archive
        policy = HttpPolicy(rate_per_second=cfg.rate_limit, concurrency=cfg.concurrency, read_timeout=cfg.timeout)
        key = reveal(cfg.api_key)
        processor = NeuralAnalogClient(cfg.base_url, key, policy=policy)
        self.closers.append(processor)

        def output_for(job: Job) -> Path | None:
            folder = self.folders.get(job.file.folder)
            return folder.output_dir if folder and folder.output_dir else cfg.output_dir

        where = service_identity("processing", cfg.base_url, cfg.api_key)
        self.store.adopt_legacy("neuralanalog", where)
        return ArchiveStage(
            self.store,
            processor,
            cfg,
            Deliverer(processor, cfg, output_for),
            self.settings.sidecar,
            where=where,
            spend=self.spend,
        )

    def excluded_dirs(self, folder: FolderConfig) -> list[str]:
        """Our own output folders inside a watched folder: never work, never watched for work."""
        out = []
        for d in (
            folder.output_dir or self.settings.archive.output_dir,
            folder.done_dir,
            folder.failed_dir,
            self.settings.sidecar.directory,
        ):
            if d is not None and inside(Path(d), folder.path) and Path(d) != folder.path:
                out.append(os.path.relpath(d, folder.path))
        return out

    def make_detector(self, folders: Sequence[FolderConfig], **kwargs: Any) -> Detector:
        excluded = {str(f.path): self.excluded_dirs(f) for f in folders}
        self.detector = Detector(folders, self.sink, excluded_dirs=excluded, **kwargs)
        return self.detector

    def _rehint(self, path: str) -> None:
        if self.detector is not None:
            self.detector.hint(path)

    def _outcome(self, outcome: Outcome) -> None:
        if outcome.stage in TERMINAL:
            self.mover.schedule(outcome.job)
        for hook in self.hooks:
            try:
                hook(outcome)
            except Exception:
                log.exception("pipeline.hook_failed", path=outcome.job.file.path)

    async def aclose(self) -> None:
        await self.mover.wait()
        for stage in self.stages.values():
            drain = getattr(stage, "drain", None)
            if drain is not None:
                await drain(PAID_DRAIN_SECONDS)
        for closer in self.closers:
            with contextlib.suppress(Exception):
                await closer.aclose()
        self.store.close()
