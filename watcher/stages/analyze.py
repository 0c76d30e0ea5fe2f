"""The analyze stage: check the file, hash it, ask the analyser only for models not yet paid for, write the sidecar.

Every model result is committed to the store the moment it arrives; content already analysed (same
sha256, same backend) is answered from the store without a request.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import structlog

from watcher.audiofile import FileBody, Signature, check_audio, sha256_file
from watcher.config import SidecarConfig
from watcher.errors import BadInput, FileChanged, RetryLater
from watcher.stages.base import JobStore, StageResult
from watcher.stages.sidecar import analysis_document, sidecar_path, write_sidecar
from watcher.store import Job, StoredResult

log = structlog.get_logger("watcher.analyze")


class ModelAnswer(Protocol):
    requested: str
    model_name: str
    model_version: str | None
    correlation_id: str | None
    results: Any


class Report(Protocol):
    results: Mapping[str, Any]
    errors: list[str]
    model_errors: dict[str, str]


class AudioBody(Protocol):
    name: str
    size: int

    def chunks(self) -> AsyncIterator[bytes]: ...


class Analyzer(Protocol):
    """An analysis backend (the remote service, or local Essentia)."""

    name: str
    final_errors: bool  # True when a model's error cannot change on retry (local analysis)

    def describe(self) -> dict[str, Any]:
        """What the sidecar records about the backend (never a secret)."""
        ...

    async def analyze(
        self,
        audio: AudioBody,
        models: Sequence[str],
        on_result: Callable[[ModelAnswer], Awaitable[None] | None],
    ) -> Report: ...


class AnalyzeStage:
    """Turns a settled file version into a sidecar."""

    kind = "analyze"
    first_stage = "pending"

    def __init__(
        self,
        store: JobStore,
        analyzer: Analyzer,
        *,
        models: Sequence[str],
        sidecar: SidecarConfig,
        max_attempts: int,
    ) -> None:
        self.store = store
        self.analyzer = analyzer
        self.models = list(models)
        self.sidecar = sidecar
        self.max_attempts = max_attempts

    async def run(self, job: Job) -> StageResult:
        version = job.file
        path = version.path
        if not os.path.isdir(version.folder):
            raise RetryLater(f"the watched folder {version.folder} is not available (unmounted share?)")
        expected = Signature(version.size, version.mtime_ns, version.inode)
        try:
            current = Signature.of(os.stat(path))
        except FileNotFoundError:
            return StageResult("gone", note="the file was deleted before it was analysed")
        if current != expected:
            raise FileChanged("the file changed after it settled; its new version will be analysed")
        if version.size == 0:
            return StageResult("skipped", note="the file is empty (0 bytes); a later write makes it a new version")
        try:
            check_audio(path)
        except FileNotFoundError:
            return StageResult("gone", note="the file was deleted before it was analysed")
        sha256 = version.sha256 or job.data.get("sha256")
        if sha256 is None:
            sha256 = await sha256_file(path, expected)
            self.store.set_sha256(version.id, sha256)
            self.store.commit(job, sha256=sha256)

        backend = self.analyzer.name
        cached = self.store.results_for(sha256, backend)
        missing = [m for m in self.models if m not in cached]
        errors: list[dict[str, str | None]] = []
        if missing:
            log.info("analyze.started", path=path, models=missing, cached=len(self.models) - len(missing))

            def save(answer: ModelAnswer) -> None:
                stored = StoredResult(
                    answer.requested,
                    answer.model_name,
                    answer.model_version,
                    answer.correlation_id,
                    answer.results,
                )
                self.store.save_result(sha256, backend, stored)
                log.info("analyze.model_done", path=path, model=answer.model_name)

            body = FileBody(path, expected)
            report = await self.analyzer.analyze(body, missing, save)
            errors = [{"model": None, "message": m} for m in report.errors]
            errors += [{"model": spec, "message": m} for spec, m in report.model_errors.items()]
            if errors:
                self.store.commit(job, errors=[*job.data.get("errors", []), *errors][-20:])
        else:
            log.info(
                "analyze.cached",
                path=path,
                models=self.models,
                next="writing the sidecar from stored results",
            )

        results = self.store.results_for(sha256, backend)
        still = [m for m in self.models if m not in results]
        if still and job.attempts + 1 < self.max_attempts and not self.analyzer.final_errors:
            detail = "; ".join(e["message"] or "" for e in errors) or "no answer"
            raise RetryLater(f"{len(still)} model(s) not answered ({', '.join(still)}): {detail}")
        if still and not self.analyzer.final_errors:
            errors = list(job.data.get("errors", []))
            errors.append(
                {"model": None, "message": f"no result after {job.attempts + 1} attempts: {', '.join(still)}"}
            )
        doc = analysis_document(
            version,
            sha256,
            backend=self.analyzer.describe(),
            models=self.models,
            results=results,
            errors=errors,
        )
        target = sidecar_path(path, version.folder, self.sidecar)
        await write_sidecar(target, sha256, doc)
        self.store.commit(job, sidecar=str(target))
        if still:
            raise BadInput(f"sidecar written without {', '.join(still)}: {errors[-1]['message']}")
        log.info("analyze.done", path=path, sidecar=str(target))
        return StageResult("done")
