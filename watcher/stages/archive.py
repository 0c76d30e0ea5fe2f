"""The archive pipeline: upload → wait → request the versions → wait → fetch the zips → deliver.

Every ID a paid call returns is committed to the store (keyed by content hash, kind and parameters)
before the next step, so restarts and retries never upload or request the same work twice. Polling is
scheduled through the store (the job comes back at its next poll time); no task waits on a remote job.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from watcher.audiofile import FileBody, Signature, check_audio, sha256_file
from watcher.config import STEM_VERSIONS, ArchiveConfig, SidecarConfig
from watcher.errors import BadInput, FileChanged, RetryLater
from watcher.stages.base import StageResult
from watcher.stages.deliver import Deliverer
from watcher.stages.sidecar import sidecar_path, source_document, write_sidecar
from watcher.store import Job, RemoteObject

log = structlog.get_logger("watcher.archive")
SERVICE = "neuralanalog"


class StatusLike(Protocol):
    is_complete: bool
    is_failed: bool
    error_message: str | None


class OfferLike(Protocol):
    download_url: str | None
    email_notification_queued: bool
    archive_incomplete: bool


class UploadBody(Protocol):
    name: str
    size: int

    def chunks(self) -> AsyncIterator[bytes]: ...


class Processor(Protocol):
    """The processing service as the archive stage needs it (implemented by the Neural Analog client)."""

    async def upload(self, source: UploadBody) -> str: ...

    async def status(self, kind: str, object_id: str) -> StatusLike: ...

    async def restore(self, audio_id: str, params: Mapping[str, Any]) -> str: ...

    async def master(self, audio_id: str, params: Mapping[str, Any], upscaled_id: str | None = None) -> str: ...

    async def create_stems(self, source_field: str, source_id: str, params: Mapping[str, Any]) -> str: ...


class ArchiveStore(Protocol):
    def commit(self, job: Job, *, stage: str | None = None, **data: Any) -> None: ...

    def set_sha256(self, file_id: int, sha256: str) -> None: ...

    def remote_get(self, sha256: str, service: str, kind: str, params: str) -> RemoteObject | None: ...

    def remote_put(
        self, sha256: str, service: str, kind: str, params: str, remote_id: str, state: str = "requested"
    ) -> None: ...

    def remote_set_state(
        self, sha256: str, service: str, kind: str, params: str, state: str, error: str | None = None
    ) -> None: ...


@dataclass(frozen=True)
class Op:
    """One remote object the versions need: its name, status kind, dependency and parameters."""

    name: str  # audio, restored, mastered, stems:original, stems:restored, stems:mastered
    status_kind: str  # as in GET /status/{kind}/{id}
    needs: str | None
    params: Mapping[str, Any]

    def key(self, plan: Mapping[str, Op]) -> str:
        """Parameters and the chain they build on, as a stable string: part of the store's key."""
        chain: list[Any] = []
        op: Op | None = self
        while op is not None:
            chain.append([op.name, dict(op.params)])
            op = plan.get(op.needs) if op.needs else None
        return hashlib.sha256(json.dumps(chain, sort_keys=True).encode()).hexdigest()[:16]


def plan_ops(cfg: ArchiveConfig) -> dict[str, Op]:
    """The remote objects needed for the configured versions, in dependency order."""
    wanted = cfg.wanted()
    ops: dict[str, Op] = {"audio": Op("audio", "audio", None, {})}
    if "restored" in wanted or "restored_stems" in wanted:
        ops["restored"] = Op("restored", "upscaled", "audio", cfg.restore)
    if "mastered" in wanted or "mastered_stems" in wanted:
        ops["mastered"] = Op("mastered", "mastered", "audio", cfg.master)
    for v in wanted:
        if v in STEM_VERSIONS:
            source = v.removesuffix("_stems")
            ops[f"stems:{source}"] = Op(
                f"stems:{source}", "stem_split", "audio" if source == "original" else source, cfg.stems
            )
    return ops


def version_op(version: str) -> str:
    """The remote object a delivered version comes from."""
    if version in STEM_VERSIONS:
        return "stems:" + version.removesuffix("_stems")
    return "audio" if version == "original" else version


class ArchiveStage:
    """Drives one file version through the processing service to a delivery folder."""

    kind = "archive"
    first_stage = "pending"

    def __init__(
        self,
        store: ArchiveStore,
        processor: Processor,
        cfg: ArchiveConfig,
        deliverer: Deliverer,
        sidecar: SidecarConfig,
    ) -> None:
        self.store = store
        self.processor = processor
        self.cfg = cfg
        self.deliverer = deliverer
        self.sidecar = sidecar
        self.plan = plan_ops(cfg)
        self._in_flight: set[asyncio.Future[str]] = set()

    async def run(self, job: Job) -> StageResult:
        step = {
            "pending": self._check,
            "upload": self._upload,
            "process": self._process,
            "fetch": self._fetch,
        }.get(job.stage)
        if step is None:
            raise BadInput(f"unknown archive stage {job.stage!r} in the store")
        return await step(job)

    # -- steps -------------------------------------------------------------------------------------------

    async def _check(self, job: Job) -> StageResult:
        version = job.file
        if not os.path.isdir(version.folder):
            raise RetryLater(f"the watched folder {version.folder} is not available (unmounted share?)")
        expected = Signature(version.size, version.mtime_ns, version.inode)
        try:
            if Signature.of(os.stat(version.path)) != expected:
                raise FileChanged("the file changed after it settled; its new version will be archived")
        except FileNotFoundError:
            return StageResult("gone", note="the file was deleted before it was archived")
        if version.size == 0:
            return StageResult("skipped", note="the file is empty (0 bytes)")
        check_audio(version.path)
        sha256 = version.sha256 or await sha256_file(version.path, expected)
        self.store.set_sha256(version.id, sha256)
        self.store.commit(job, stage="upload", sha256=sha256, versions=dict.fromkeys(self.cfg.wanted(), "pending"))
        return await self._upload(job)

    async def _upload(self, job: Job) -> StageResult:
        sha256 = job.data["sha256"]
        op = self.plan["audio"]
        known = self.store.remote_get(sha256, SERVICE, "audio", op.key(self.plan))
        if known is None:
            version = job.file
            body = FileBody(version.path, Signature(version.size, version.mtime_ns, version.inode))
            log.info("archive.upload_started", path=version.path, size=version.size)
            audio_id = await self._paid(self.processor.upload(body), sha256, "audio", op.key(self.plan))
            log.info("archive.uploaded", path=version.path, audio_id=audio_id)
        else:
            audio_id = known.remote_id
            log.info(
                "archive.upload_reused",
                path=job.file.path,
                audio_id=audio_id,
                next="this content was uploaded before; not uploading again",
            )
        self.store.commit(job, stage="process", audio_id=audio_id, polls=0)
        return await self._process(job)

    async def _process(self, job: Job) -> StageResult:
        """Request what is due, poll what is in flight; come back later while anything is in progress."""
        sha256 = job.data["sha256"]
        ids: dict[str, str] = dict(job.data.get("ids", {}))
        states: dict[str, str] = {}
        errors: dict[str, str] = dict(job.data.get("op_errors", {}))
        waiting = False
        for name, op in self.plan.items():
            key = op.key(self.plan)
            obj = self.store.remote_get(sha256, SERVICE, name, key)
            if obj is None:
                dep = states.get(op.needs) if op.needs else "complete"
                if dep == "failed":
                    states[name] = "failed"
                    errors[name] = f"{op.needs or 'audio'} failed"
                    continue
                if dep != "complete":
                    waiting = True
                    continue
                remote_id = await self._paid(self._request(name, op, ids), sha256, name, key)
                ids[name] = remote_id
                self.store.commit(job, ids=ids)
                log.info("archive.requested", path=job.file.path, what=name, id=remote_id)
                waiting = True
                states[name] = "requested"
                continue
            ids[name] = obj.remote_id
            if obj.state == "requested":
                status = await self.processor.status(op.status_kind, obj.remote_id)
                if status.is_failed:
                    message = status.error_message or "the service reported a failure"
                    self.store.remote_set_state(sha256, SERVICE, name, key, "failed", message)
                    log.error(
                        "archive.processing_failed",
                        path=job.file.path,
                        what=name,
                        error=message,
                        next="delivering the other versions",
                    )
                    states[name], errors[name] = "failed", message
                elif status.is_complete:
                    self.store.remote_set_state(sha256, SERVICE, name, key, "complete")
                    states[name] = "complete"
                else:
                    states[name] = "requested"
                    waiting = True
            else:
                states[name] = obj.state
                if obj.error:
                    errors[name] = obj.error
        versions = {
            v: ("failed: " + errors.get(version_op(v), ""))
            if states.get(version_op(v)) == "failed"
            else ("ready" if states.get(version_op(v)) == "complete" else "processing")
            for v in self.cfg.wanted()
        }
        if states.get("audio") == "failed":
            self.store.commit(job, ids=ids, op_errors=errors, versions=versions)
            raise BadInput(f"the service could not process the upload: {errors.get('audio')}")
        if waiting:
            polls = int(job.data.get("polls", 0)) + 1
            delay = min(self.cfg.poll_max, self.cfg.poll_initial * (1.5 ** (polls - 1)))
            self.store.commit(job, ids=ids, op_errors=errors, versions=versions, polls=polls)
            return StageResult("process", next_attempt_at=time.time() + delay)
        self.store.commit(job, stage="fetch", ids=ids, op_errors=errors, versions=versions)
        return await self._fetch(job)

    async def _paid(self, call: Coroutine[Any, Any, str], sha256: str, kind: str, key: str) -> str:
        """Run a paid call so that its ID is stored even if this job is cancelled (shutdown) meanwhile.

        The call runs as its own task, shielded from the job's cancellation; whenever it returns an ID, the
        ID is committed at once. Shutdown waits briefly for such calls (:meth:`drain`).
        """

        async def call_and_record() -> str:
            remote_id = await call
            self.store.remote_put(sha256, SERVICE, kind, key, remote_id)
            return remote_id

        task = asyncio.ensure_future(call_and_record())
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return await asyncio.shield(task)

    async def drain(self, timeout: float) -> None:
        """Give paid calls still in flight (after their jobs were cancelled) a moment to return their IDs."""
        if self._in_flight:
            log.info(
                "archive.draining", calls=len(self._in_flight), next=f"waiting up to {timeout:.0f} s for their IDs"
            )
            _, pending = await asyncio.wait(set(self._in_flight), timeout=timeout)
            for task in pending:
                task.cancel()

    async def _request(self, name: str, op: Op, ids: Mapping[str, str]) -> str:
        audio_id = ids["audio"]
        if name == "restored":
            return await self.processor.restore(audio_id, op.params)
        if name == "mastered":
            return await self.processor.master(audio_id, op.params)
        source = name.split(":", 1)[1]
        field, source_id = {
            "original": ("audio_id", audio_id),
            "restored": ("upscaled_id", ids.get("restored", "")),
            "mastered": ("mastered_id", ids.get("mastered", "")),
        }[source]
        return await self.processor.create_stems(field, source_id, op.params)

    async def _fetch(self, job: Job) -> StageResult:
        ready = [v for v, state in job.data.get("versions", {}).items() if state == "ready"]
        if not ready:
            raise BadInput(
                "no version could be made: " + "; ".join(f"{k}: {v}" for k, v in job.data.get("versions", {}).items())
            )
        delivery = await self.deliverer.deliver(job, ready, {k: v for k, v in job.data.get("ids", {}).items()})
        versions = dict(job.data["versions"])
        for v in ready:
            versions[v] = "delivered"
        self.store.commit(job, delivery=str(delivery), versions=versions)
        ids = dict(job.data.get("ids", {}))
        await write_sidecar(
            sidecar_path(job.file.path, job.file.folder, self.sidecar),
            job.data["sha256"],
            {
                "source": source_document(job.file, job.data["sha256"]),
                "archive": {
                    "audio_id": ids.get("audio", ""),
                    "jobs": {k: v for k, v in ids.items() if k != "audio"},
                    "versions": versions,
                    "delivery": str(delivery),
                },
            },
        )
        failed = [v for v, s in versions.items() if s.startswith("failed")]
        note = f"delivered to {delivery}" + (f"; failed: {', '.join(failed)}" if failed else "")
        return StageResult("done", note=note)
