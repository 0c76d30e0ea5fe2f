"""The archive pipeline: upload → wait → request the versions → wait → fetch the zips → deliver.

Every ID a paid call returns is committed to the store (keyed by content hash, kind and parameters)
before the next step, so restarts and retries never upload or request the same work twice. Polling is
scheduled through the store (the job comes back at its next poll time); no task waits on a remote job.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog

from watcher.audiofile import UPLOAD_CHUNK, FileBody, Signature
from watcher.config import ArchiveConfig, SidecarConfig
from watcher.errors import BadInput, RetryLater
from watcher.fsutil import safe_component
from watcher.media import audio_info
from watcher.names import display
from watcher.pipelines.adopt import record_paid, resume_ids, verified_delivery
from watcher.pipelines.base import SpendObserver, StepResult
from watcher.pipelines.deliver import Deliverer
from watcher.pipelines.paid import GateStore, PaidCalls, Taken, ending_of
from watcher.pipelines.plan import Op, operation, plan_ops
from watcher.pipelines.precheck import precheck
from watcher.pipelines.processor import Processor
from watcher.pipelines.sidecar import live_revision, sidecar_path, source_document, write_sidecar
from watcher.store import Job, Operation, State, Step
from watcher.versions import VERSIONS

log = structlog.get_logger("watcher.archive")
BUDGET = "processing"


def _track_seconds(folder: Path) -> float | None:
    """The duration of a delivered full-length track (the original first), or None when none tells it."""
    tracks = sorted(folder.glob("*.wav"), key=lambda p: "(original)" not in p.name)
    for track in tracks:
        seconds = audio_info(track, container="wav").duration
        if seconds:
            return seconds
    return None


def _version_state(product: str, states: Mapping[str, str], errors: Mapping[str, str]) -> str:
    """What `watcher status` says of a version: ready, processing, or failed with the service's reason."""
    state = states.get(product)
    if state == "failed":
        return "failed: " + errors.get(product, "")
    return "ready" if state == "complete" else "processing"


class ArchiveStore(GateStore, Protocol):
    """The part of the store this pipeline uses (the gate through PaidCalls)."""

    async def commit(self, job: Job, *, step: Step | None = None, **data: Any) -> None: ...

    async def set_sha256(self, file_id: int, sha256: str) -> None: ...

    async def is_live(self, job: Job) -> bool: ...

    async def gate_get(self, op: Operation) -> dict[str, Any] | None: ...

    async def gate_adopt(self, op: Operation, result: str) -> bool: ...

    async def set_remote_state(self, op: Operation, state: str, error: str | None = None) -> None: ...

    async def ledger_settle(self, sha256: str, seconds: float) -> int: ...


class ArchivePipeline:
    """Drives one revision through the processing service to a delivery folder.

    Steps: ``check`` → ``upload`` → ``process`` (request what is due, poll what is in flight) → ``fetch``.
    """

    name = "archive"
    first_step = Step.CHECK
    service = "processing"

    def __init__(
        self,
        store: ArchiveStore,
        processor: Processor,
        cfg: ArchiveConfig,
        deliverer: Deliverer,
        sidecar: SidecarConfig,
        *,
        where: str,
        spend: SpendObserver | None = None,
    ) -> None:
        self.store = store
        self.processor = processor
        self.cfg = cfg
        self.deliverer = deliverer
        self.sidecar = sidecar
        self.where = where  # the service's endpoint and account, as the gate keys its operations
        self.paid = PaidCalls(
            store,
            BUDGET,
            cap_minutes=cfg.daily_audio_minutes,
            resend_in_doubt=cfg.in_doubt == "resend",
            spend=spend,
        )
        self.plan = plan_ops(cfg)
        self._sending: set[asyncio.Future[str]] = set()

    async def run(self, job: Job) -> StepResult:
        step = {
            Step.CHECK: self._check,
            Step.UPLOAD: self._upload,
            Step.PROCESS: self._process,
            Step.FETCH: self._fetch,
        }.get(job.step)
        if step is None:
            raise BadInput(f"unknown archive step '{job.step}' in the store")
        return await step(job)

    async def give_up(self, job: Job, error: str) -> None:
        """Nothing to add: the job's versions and error are in the store and `watcher status`."""

    def operation(self, sha256: str, name: str) -> Operation:
        """The gate's identity of one remote product of the plan for this content."""
        return operation(self.plan, sha256, self.where, name)

    # -- steps -------------------------------------------------------------------------------------------

    async def _check(self, job: Job) -> StepResult:
        checked = await precheck(self.store, job)
        if isinstance(checked, StepResult):
            return checked
        adopted = await self._adopt(job, checked.sha256)
        if adopted is not None:
            return adopted
        await self.store.commit(job, step=Step.UPLOAD, versions=dict.fromkeys(self.cfg.wanted(), "pending"))
        if await self._resume(job, checked.sha256):
            return await self._process(job)
        return await self._upload(job, checked.content)

    async def _resume(self, job: Job, sha256: str) -> bool:
        """Processing a lost store had under way, recorded beside the file (see watcher.pipelines.adopt): its IDs
        are taken as answered, so the job polls and downloads instead of uploading and requesting again."""
        ops = {name: self.operation(sha256, name) for name in self.plan}
        path = sidecar_path(job.file.path, job.file.folder, self.sidecar)
        found = await resume_ids(path, self.store, sha256=sha256, size=job.file.size, ops=ops, where=job.file.path)
        if found:
            await self.store.commit(job, step=Step.PROCESS, audio_id=found.get("audio"), ids=found, polls=0)
        return bool(found)

    async def _record(self, job: Job, ids: Mapping[str, str]) -> None:
        """The processing IDs answered so far, kept beside the file too (the sidecar's ``archive.paid``)."""
        sha256 = job.data["sha256"]
        answered = {name: (self.operation(sha256, name), ids[name]) for name in self.plan if ids.get(name)}
        path = sidecar_path(job.file.path, job.file.folder, self.sidecar)
        live = lambda: self.store.is_live(job)  # noqa: E731
        await record_paid(path, job.file, sha256, answered, versions=self.cfg.wanted(), live=live)

    async def _adopt(self, job: Job, sha256: str) -> StepResult | None:
        """A delivery already in place for this content, verified against its manifest (see
        watcher.pipelines.adopt), counts as delivered: nothing is uploaded or requested. None: there is none."""
        if self.deliverer.output_for(job) is None:
            return None
        target = self.deliverer.target(job)
        wanted = self.cfg.wanted()
        found = await asyncio.to_thread(verified_delivery, target, sha256=sha256, size=job.file.size, wanted=wanted)
        if found is None:
            return None
        log.info(
            "archive.adopted",
            path=job.file.path,
            delivery=display(target),
            versions=sorted(wanted),
            next="no upload and no processing request",
        )
        job.data.update(delivery=str(target), versions=dict.fromkeys(wanted, "delivered"), adopted="manifest")
        return StepResult(State.DONE, note=f"adopted the delivery already in {display(target)}")

    async def _upload(self, job: Job, content: bytes | None = None) -> StepResult:
        """Upload the file (from ``content``, a small file's settled bytes read by the check, else from disk)."""
        revision = job.file
        op = self.operation(job.data["sha256"], "audio")

        async def upload() -> str:
            # The service echoes this name in its zips: one safe component, whatever bytes the name holds.
            label = safe_component(os.path.basename(revision.path), "audio.wav")
            settled = Signature(revision.size, revision.mtime_ns, revision.inode)
            body = FileBody(revision.path, settled, name=label, content=content, chunk_size=UPLOAD_CHUNK)
            log.info("archive.upload_started", path=revision.path, size=revision.size)
            return await self.processor.upload(body)

        audio_id = await self._paid(job, op, upload)
        log.info("archive.uploaded", path=revision.path, audio_id=audio_id)
        await self.store.commit(job, step=Step.PROCESS, audio_id=audio_id, polls=0)
        await self._record(job, {"audio": audio_id})
        return await self._process(job)

    async def _process(self, job: Job) -> StepResult:
        """Request what is due, poll what is in flight; come back later while anything is in progress."""
        upload = await self.store.gate_get(self.operation(job.data["sha256"], "audio"))
        if upload is None or upload["state"] != "answered":
            # The upload was made for another account or endpoint (the key or URL changed since): this service
            # has not got the file, so it is uploaded here first (through the gate, like any upload).
            log.info("archive.upload_again", path=job.file.path, next="uploading to the service now configured")
            return await self._upload(job)
        ids: dict[str, str] = dict(job.data.get("ids", {}))
        states: dict[str, str] = {}
        errors: dict[str, str] = dict(job.data.get("op_errors", {}))
        for name in self.plan:
            states[name] = await self._advance(job, name, ids, states, errors)
        versions = {v: _version_state(VERSIONS[v].product, states, errors) for v in self.cfg.wanted()}
        if states.get("audio") == "failed":
            await self.store.commit(job, ids=ids, op_errors=errors, versions=versions)
            raise BadInput(f"the service could not process the upload: {errors.get('audio')}")
        if any(state in ("waiting", "requested") for state in states.values()):
            polls = int(job.data.get("polls", 0)) + 1
            delay = min(self.cfg.poll_max, self.cfg.poll_initial * (1.5 ** (polls - 1)))
            # Recorded by the release that schedules the next poll (every ID is kept by the gate already).
            job.data.update(ids=ids, op_errors=errors, versions=versions, polls=polls)
            return StepResult.later(Step.PROCESS, time.time() + delay)
        await self.store.commit(job, step=Step.FETCH, ids=ids, op_errors=errors, versions=versions)
        return await self._fetch(job)

    async def _advance(
        self, job: Job, name: str, ids: dict[str, str], states: Mapping[str, str], errors: dict[str, str]
    ) -> str:
        """Move one product of the plan on: request it once what it builds on is complete, else poll it.

        Returns its state: waiting (for what it builds on), requested, complete or failed.
        """
        product = self.plan[name]
        op = self.operation(job.data["sha256"], name)
        row = await self.store.gate_get(op)
        if row is None or row["state"] != "answered":
            before = states.get(product.needs) if product.needs else "complete"
            if before == "failed":
                errors[name] = f"{product.needs or 'audio'} failed"
                return "failed"
            if before != "complete":
                return "waiting"
            ids[name] = await self._paid(job, op, lambda: self._request(name, product, ids))
            await self.store.commit(job, ids=ids)
            await self._record(job, ids)
            log.info("archive.requested", path=job.file.path, what=name, id=ids[name])
            return "requested"
        ids[name] = str(row["result"])
        if row["remote_state"] not in (None, "requested"):
            if row["remote_error"]:
                errors[name] = row["remote_error"]
            return str(row["remote_state"])
        status = await self.processor.poll(product.status_kind, ids[name])
        if status.is_failed:
            message = status.error_message or "the service reported a failure"
            await self.store.set_remote_state(op, "failed", message)
            log.error(
                "archive.processing_failed", path=job.file.path, what=name, error=message, next="delivering the others"
            )
            errors[name] = message
            return "failed"
        if status.is_complete:
            await self.store.set_remote_state(op, "complete")
            return "complete"
        return "requested"

    async def _paid(self, job: Job, op: Operation, call: Callable[[], Coroutine[Any, Any, str]]) -> str:
        """Send one paid request through the gate, or reuse its answer (see watcher.pipelines.paid).

        The request runs as its own task, shielded from the job's cancellation, so its ending is recorded at
        the gate even when a stop interrupts the job; shutdown waits briefly for such calls (:meth:`drain`).
        """
        seconds = float(job.data.get("charged") or job.data.get("duration") or 0.0)
        taken = await self.paid.take(job, [op], seconds, estimated=bool(job.data.get("estimated")))
        if op in taken.answered:
            result = taken.answered[op]
            assert result is not None
            log.info("archive.reused", path=job.file.path, operation=op.name, id=result, next="not sent again")
            return result
        task = asyncio.ensure_future(self._send(taken, op, call))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        return await asyncio.shield(task)

    async def _send(self, taken: Taken, op: Operation, call: Callable[[], Coroutine[Any, Any, str]]) -> str:
        """The request itself, and the gate's record of how it ended."""
        try:
            remote_id = await call()
        except BaseException as exc:
            ending = ending_of(exc, taken)
            if ending != "in_doubt":
                # Provably not done: never connected, 429/503, a body cut short, stopped before it left, or refused
                # with an answer (4xx): free again, and not paid.
                await self.paid.finish(
                    taken, {}, ending, str(exc) or f"stopped before it was sent ({type(exc).__name__})"
                )
                raise
            # The whole request may have reached the service and its answer is lost or cannot be read (a 2xx
            # without its ID, a 3xx): it may be done (and billed).
            why = str(exc) if isinstance(exc, RetryLater | BadInput) else f"{type(exc).__name__}: {exc}"
            await self.paid.finish(taken, {}, "in_doubt", why)
            if op.on_doubt == "hold" and self.cfg.in_doubt == "hold" and isinstance(exc, Exception):
                raise self.paid.doubt(op, time.time(), why) from exc
            raise
        await self.paid.finish(taken, {op: remote_id}, "answered", "")
        return remote_id

    async def drain(self, timeout: float) -> None:
        """Give paid calls still in flight (after their jobs were cancelled) a moment to return their IDs."""
        if self._sending:
            log.info(
                "archive.draining", calls=len(self._sending), next=f"waiting up to {timeout:.0f} s for their IDs"
            )
            _, pending = await asyncio.wait(set(self._sending), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)

    async def _settle(self, job: Job, delivered: Path) -> None:
        """The source's headers gave no duration, so its paid calls were charged an upper bound: a delivered
        full-length track (decoded by the service, with a WAV header) tells the real one; the ledger settles to it."""
        seconds = await asyncio.to_thread(_track_seconds, delivered)
        if seconds is None:
            return
        settled = await self.store.ledger_settle(job.data["sha256"], seconds)
        job.data.update(estimated=False, charged=seconds, duration=job.data.get("duration") or seconds)
        log.info("archive.duration_settled", path=job.file.path, seconds=round(seconds, 3), ledger_lines=settled)

    async def _request(self, name: str, op: Op, ids: Mapping[str, str]) -> str:
        """The request that creates one remote object of the plan."""
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

    async def _fetch(self, job: Job) -> StepResult:
        """Deliver the ready versions, then say so in the sidecar; a delivery made before a stop is not redone."""
        versions = dict(job.data.get("versions", {}))
        ready = [v for v, state in versions.items() if state == "ready"]
        if not ready and not job.data.get("delivery"):
            raise BadInput("no version could be made: " + "; ".join(f"{k}: {v}" for k, v in versions.items()))
        if ready:
            sidecar = sidecar_path(job.file.path, job.file.folder, self.sidecar)
            delivered = await self.deliverer.deliver(
                job,
                ready,
                dict(job.data.get("ids", {})),
                placing=lambda: live_revision(sidecar, job.file, lambda: self.store.is_live(job)),
            )
            versions.update(dict.fromkeys(ready, "delivered"))
            if job.data.get("estimated"):
                await self._settle(job, delivered)
            await self.store.commit(job, delivery=str(delivered), versions=versions)
        delivery = job.data["delivery"]
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
                    "delivery": display(delivery),
                },
            },
            revision=job.file,
            live=lambda: self.store.is_live(job),
        )
        failed = [v for v, s in versions.items() if s.startswith("failed")]
        note = f"delivered to {delivery}" + (f"; failed: {', '.join(failed)}" if failed else "")
        return StepResult(State.DONE, note=note)
