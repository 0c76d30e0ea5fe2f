"""The archive pipeline: upload → wait → request the versions → wait → fetch the zips → deliver.

Every ID a paid call returns is committed to the store (keyed by content hash, kind and parameters)
before the next step, so restarts and retries never upload or request the same work twice. Polling is
scheduled through the store (the job comes back at its next poll time); no task waits on a remote job.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from watcher.audiofile import FileBody, Signature
from watcher.config import STEM_VERSIONS, ArchiveConfig, SidecarConfig
from watcher.errors import BadInput, Deferred, InDoubt, NeedsUser, NotSent, Rejected, RetryLater
from watcher.pipelines.base import NullSpend, SpendObserver, StepResult
from watcher.pipelines.deliver import Deliverer
from watcher.pipelines.precheck import precheck
from watcher.pipelines.sidecar import sidecar_path, source_document, write_sidecar
from watcher.store import Job, Operation, Ticket

log = structlog.get_logger("watcher.archive")
BUDGET = "processing"
# The gate's name for each remote object the plan needs (what the service bills for).
OPERATION = {"audio": "upload", "restored": "restore", "mastered": "master"}


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
    """The processing service as the archive pipeline needs it (implemented by the Neural Analog client)."""

    async def upload(self, source: UploadBody) -> str: ...

    async def status(self, kind: str, object_id: str) -> StatusLike: ...

    async def restore(self, audio_id: str, params: Mapping[str, Any]) -> str: ...

    async def master(self, audio_id: str, params: Mapping[str, Any], upscaled_id: str | None = None) -> str: ...

    async def create_stems(self, source_field: str, source_id: str, params: Mapping[str, Any]) -> str: ...


class ArchiveStore(Protocol):
    """The part of the store this pipeline uses."""

    def commit(self, job: Job, *, step: str | None = None, **data: Any) -> None: ...

    def set_sha256(self, file_id: int, sha256: str) -> None: ...

    def is_live(self, job: Job) -> bool: ...

    def gate_take(
        self,
        ops: Sequence[Operation],
        owner: str,
        *,
        budget: str,
        seconds: float,
        cap_seconds: float | None = None,
        resend_in_doubt: bool = False,
    ) -> list[Ticket]: ...

    def gate_answered(self, op: Operation, result: str | None = None) -> None: ...

    def gate_release(self, op: Operation, state: str, *, error: str | None = None) -> None: ...

    def gate_get(self, op: Operation) -> dict[str, Any] | None: ...

    def ledger_outcome(self, request: int, outcome: str) -> None: ...

    def set_remote_state(self, op: Operation, state: str, error: str | None = None) -> None: ...


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


class ArchivePipeline:
    """Drives one file version through the processing service to a delivery folder.

    Steps: ``check`` → ``upload`` → ``process`` (request what is due, poll what is in flight) → ``fetch``.
    """

    name = "archive"
    first_step = "check"
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
        self.spend = spend or NullSpend()
        self.cap_seconds = cfg.daily_audio_minutes * 60 if cfg.daily_audio_minutes else None
        self.plan = plan_ops(cfg)
        self._in_flight: set[asyncio.Future[str]] = set()

    async def run(self, job: Job) -> StepResult:
        step = {
            "check": self._check,
            "upload": self._upload,
            "process": self._process,
            "fetch": self._fetch,
        }.get(job.step)
        if step is None:
            raise BadInput(f"unknown archive step {job.step!r} in the store")
        return await step(job)

    async def give_up(self, job: Job, error: str) -> None:
        """Nothing to add: the job's versions and error are in the store and `watcher status`."""

    def operation(self, sha256: str, name: str) -> Operation:
        """The gate's identity of one remote object of the plan for this content."""
        op = self.plan[name]
        label = OPERATION.get(name, name)
        return Operation(sha256, self.where, label, op.key(self.plan), "reask" if name == "audio" else "hold")

    # -- steps -------------------------------------------------------------------------------------------

    async def _check(self, job: Job) -> StepResult:
        checked = await precheck(self.store, job)
        if isinstance(checked, StepResult):
            return checked
        self.store.commit(job, step="upload", versions=dict.fromkeys(self.cfg.wanted(), "pending"))
        return await self._upload(job)

    async def _upload(self, job: Job) -> StepResult:
        version = job.file
        op = self.operation(job.data["sha256"], "audio")

        async def upload() -> str:
            body = FileBody(version.path, Signature(version.size, version.mtime_ns, version.inode))
            log.info("archive.upload_started", path=version.path, size=version.size)
            return await self.processor.upload(body)

        audio_id = await self._paid(job, op, upload)
        log.info("archive.uploaded", path=version.path, audio_id=audio_id)
        self.store.commit(job, step="process", audio_id=audio_id, polls=0)
        return await self._process(job)

    async def _process(self, job: Job) -> StepResult:
        """Request what is due, poll what is in flight; come back later while anything is in progress."""
        sha256 = job.data["sha256"]
        ids: dict[str, str] = dict(job.data.get("ids", {}))
        states: dict[str, str] = {}
        errors: dict[str, str] = dict(job.data.get("op_errors", {}))
        waiting = False
        for name, plan_op in self.plan.items():
            op = self.operation(sha256, name)
            row = self.store.gate_get(op)
            if row is None or row["state"] != "answered":
                dep = states.get(plan_op.needs) if plan_op.needs else "complete"
                if dep == "failed":
                    states[name] = "failed"
                    errors[name] = f"{plan_op.needs or 'audio'} failed"
                    continue
                if dep != "complete":
                    waiting = True
                    continue
                remote_id = await self._paid(job, op, lambda n=name, p=plan_op: self._request(n, p, ids))
                ids[name] = remote_id
                self.store.commit(job, ids=ids)
                log.info("archive.requested", path=job.file.path, what=name, id=remote_id)
                waiting = True
                states[name] = "requested"
                continue
            ids[name] = str(row["result"])
            if row["remote_state"] in (None, "requested"):
                status = await self.processor.status(plan_op.status_kind, ids[name])
                if status.is_failed:
                    message = status.error_message or "the service reported a failure"
                    self.store.set_remote_state(op, "failed", message)
                    log.error(
                        "archive.processing_failed",
                        path=job.file.path,
                        what=name,
                        error=message,
                        next="delivering the other versions",
                    )
                    states[name], errors[name] = "failed", message
                elif status.is_complete:
                    self.store.set_remote_state(op, "complete")
                    states[name] = "complete"
                else:
                    states[name] = "requested"
                    waiting = True
            else:
                states[name] = row["remote_state"]
                if row["remote_error"]:
                    errors[name] = row["remote_error"]
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
            return StepResult.later("process", time.time() + delay)
        self.store.commit(job, step="fetch", ids=ids, op_errors=errors, versions=versions)
        return await self._fetch(job)

    async def _paid(self, job: Job, op: Operation, call: Callable[[], Coroutine[Any, Any, str]]) -> str:
        """Send one paid request through the gate, or learn why not (answered already, wait, cap, in doubt).

        The request runs as its own task, shielded from the job's cancellation, so its outcome is recorded at
        the gate even when a stop interrupts the job; shutdown waits briefly for such calls (:meth:`drain`).
        """
        assert job.owner is not None, "a paid request needs a claimed job"
        seconds = float(job.data.get("duration") or 0.0)
        [ticket] = self.store.gate_take(
            [op],
            job.owner,
            budget=BUDGET,
            seconds=seconds,
            cap_seconds=self.cap_seconds,
            resend_in_doubt=self.cfg.in_doubt == "resend",
        )
        if ticket.verdict == "answered":
            assert ticket.result is not None
            log.info("archive.reused", path=job.file.path, operation=op.name, id=ticket.result, next="not sent again")
            return ticket.result
        if ticket.verdict != "send":
            raise self._not_now(job, ticket)
        if ticket.resend:
            log.warning(
                "archive.resend",
                path=job.file.path,
                sha256=op.sha256,
                operation=op.name,
                next="sending again a request whose answer was lost: the service may count it twice",
            )
        assert ticket.request is not None
        task = asyncio.ensure_future(self._send(job, op, ticket.request, seconds, call))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return await asyncio.shield(task)

    async def _send(
        self, job: Job, op: Operation, request: int, seconds: float, call: Callable[[], Coroutine[Any, Any, str]]
    ) -> str:
        """The request itself, and the gate's record of how it ended."""
        try:
            remote_id = await call()
        except (NotSent, Rejected, NeedsUser) as exc:
            # Provably not done: never connected, 429/503, a body cut short, or refused with an answer.
            self.store.gate_release(op, "open", error=str(exc))
            self._ledger(request, op, "not_sent", seconds)
            raise
        except BaseException as exc:
            # The whole request may have reached the service and its answer is lost: it may be done (and billed).
            why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RetryLater) else str(exc)
            self.store.gate_release(op, "in_doubt" if op.on_doubt == "hold" else "reask", error=why)
            self._ledger(request, op, "in_doubt", seconds)
            if op.on_doubt == "hold" and self.cfg.in_doubt == "hold" and isinstance(exc, Exception):
                raise self._doubt(job, op, time.time(), why) from exc
            raise
        self.store.gate_answered(op, remote_id)
        self._ledger(request, op, "answered", seconds)
        return remote_id

    def _ledger(self, request: int, op: Operation, outcome: str, seconds: float) -> None:
        self.store.ledger_outcome(request, outcome)
        self.spend.paid(BUDGET, op.name, outcome, 0.0 if outcome == "not_sent" else seconds)

    def _doubt(self, job: Job, op: Operation, since: float, why: str | None) -> InDoubt:
        return InDoubt(
            f"{op.name} was sent in full but its answer was lost ({why or 'no answer'}); it may have been done and "
            "billed, so it is held: `watcher retry --in-doubt` (or `watcher retry PATH`) sends it again",
            operation=op.name,
            since=since,
            keys=[[op.sha256, op.service, op.name, op.params]],
        )

    def _not_now(self, job: Job, ticket: Ticket) -> Exception:
        """Why a paid request is not sent now, as the error the runner schedules by."""
        op = ticket.op
        if ticket.verdict == "in_doubt":
            return self._doubt(job, op, ticket.since or time.time(), ticket.error)
        if ticket.verdict == "capped":
            assert ticket.until is not None and ticket.cap_seconds is not None
            if ticket.first_cap:
                self.spend.capped(BUDGET, ticket.spent_seconds, ticket.cap_seconds, ticket.until)
            return Deferred(
                f"the daily cap of {ticket.cap_seconds / 60:g} audio minutes for the processing service is reached "
                f"({ticket.spent_seconds / 60:.1f} used today); {op.name} resumes after 00:00 UTC",
                until=ticket.until,
                code="capped",
            )
        return Deferred(
            f"another copy of this content is already sending {op.name}; waiting for its answer instead of paying "
            "twice",
            until=ticket.until or time.time() + 1,
        )

    async def drain(self, timeout: float) -> None:
        """Give paid calls still in flight (after their jobs were cancelled) a moment to return their IDs."""
        if self._in_flight:
            log.info(
                "archive.draining", calls=len(self._in_flight), next=f"waiting up to {timeout:.0f} s for their IDs"
            )
            _, pending = await asyncio.wait(set(self._in_flight), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)

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
            version=job.file,
            live=lambda: self.store.is_live(job),
        )
        failed = [v for v, s in versions.items() if s.startswith("failed")]
        note = f"delivered to {delivery}" + (f"; failed: {', '.join(failed)}" if failed else "")
        return StepResult("done", note=note)
