"""The analyze pipeline, one step: check the file, ask the backend only for models not yet paid for, write the sidecar.

Every model result is committed to the store the moment it arrives. With a paid backend each model is an
operation of the gate (content, endpoint and account, ``analyze:<model>``): two copies of one content never
ask twice, a model another job is asking for is waited for, and a day's cap is never passed. One run sends at
most one request, on the gate's ticket; a stream that breaks (or ends, or answers what cannot be read) leaves the
models not received to the next run, whose take re-asks only those: counted, charged and capped, a ``reask`` line
in the ledger. When the file's folder has an
audio URL template the service fetches the file from there (no body is sent); the file is still hashed here and
the gate goes by that content, exactly as with a body.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import structlog

from watcher.audiofile import FileBody, Signature
from watcher.config import SidecarConfig
from watcher.config.audio_url import without_query
from watcher.errors import BadInput, FileChanged, NotSent, RetryLater
from watcher.pipelines.adopt import read_sidecar_results
from watcher.pipelines.base import SpendObserver, StepResult
from watcher.pipelines.paid import GateStore, PaidCalls, ending_of
from watcher.pipelines.precheck import Checked, precheck
from watcher.pipelines.sidecar import analysis_document, sidecar_path, write_sidecar
from watcher.store import Fence, FileRevision, Job, Operation, State, Step, StoredResult

log = structlog.get_logger("watcher.analyze")
BUDGET = "analysis"
AudioURL = Callable[[FileRevision], str | None]  # where the service fetches a file itself (None: send its bytes)


def no_audio_url(revision: FileRevision) -> str | None:
    """Every file's bytes are sent in the request body."""
    return None


class ModelAnswer(Protocol):
    @property
    def requested(self) -> str: ...

    @property
    def model_name(self) -> str: ...

    @property
    def model_version(self) -> str | None: ...

    @property
    def correlation_id(self) -> str | None: ...

    @property
    def results(self) -> Any: ...


class Report(Protocol):
    @property
    def results(self) -> Mapping[str, Any]: ...

    @property
    def errors(self) -> list[str]: ...

    @property
    def model_errors(self) -> dict[str, str]: ...


class AudioBody(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    def chunks(self) -> AsyncIterator[bytes]: ...


class Backend(Protocol):
    """An analysis backend (the remote service, or local Essentia)."""

    @property
    def name(self) -> str: ...

    @property
    def key(self) -> str: ...  # where the work is done (endpoint and account, or "local"): results are cached under it

    @property
    def paid(self) -> bool: ...  # True when each request is billed: requests then pass the gate

    @property
    def final_errors(self) -> bool: ...  # True when a model's error cannot change on retry (local analysis)

    def describe(self) -> dict[str, Any]:
        """What the sidecar records about the backend (never a secret)."""
        ...

    async def analyze(
        self,
        audio: AudioBody,
        models: Sequence[str],
        on_result: Callable[[ModelAnswer], Awaitable[None] | None],
        *,
        audio_url: str | None = None,
    ) -> Report: ...


class AnalyzeStore(GateStore, Protocol):
    """The part of the store this pipeline uses (the gate through PaidCalls)."""

    async def set_sha256(self, file_id: int, sha256: str) -> None: ...

    async def is_live(self, job: Job) -> bool: ...

    async def results_for(self, sha256: str, backend: str) -> dict[str, StoredResult]: ...

    async def save_result(
        self, sha256: str, backend: str, result: StoredResult, op: Operation | None = None, fence: Fence | None = None
    ) -> bool: ...


class AnalyzePipeline:
    """Turns a settled revision into a sidecar."""

    name = "analyze"
    first_step = Step.ANALYZE

    def __init__(
        self,
        store: AnalyzeStore,
        backend: Backend,
        *,
        models: Sequence[str],
        sidecar: SidecarConfig,
        cap_minutes: float = 0.0,
        spend: SpendObserver | None = None,
        audio_url: AudioURL = no_audio_url,
    ) -> None:
        self.store = store
        self.audio_url = audio_url
        self.backend = backend
        self.models = list(models)
        self.sidecar = sidecar
        self.service = "analysis" if backend.paid else None
        self.paid = PaidCalls(store, BUDGET, cap_minutes=cap_minutes, spend=spend) if backend.paid else None

    async def run(self, job: Job) -> StepResult:
        checked = await precheck(self.store, job)
        if isinstance(checked, StepResult):
            return checked
        results = await self.store.results_for(checked.sha256, self.backend.key)
        missing = [m for m in self.models if m not in results]
        if missing and self.backend.paid:  # paid work the store does not know may be in the sidecar on disk
            results |= await self._adopt(job, checked.sha256, missing)
            if all(m in results for m in self.models):
                job.data["adopted"] = "sidecar"
                return StepResult(State.DONE, note="adopted from its sidecar: no request made")
            missing = [m for m in self.models if m not in results]
        if missing:
            saved = await self._ask(job, checked, missing)
            if all(m in saved for m in missing):  # every result came to this job and is stored as it is here
                results |= saved
            else:  # some were answered for another copy (or not at all): the store has the whole answer
                results = await self.store.results_for(checked.sha256, self.backend.key)
        else:
            log.info(
                "analyze.cached", path=job.file.path, models=self.models, next="writing the sidecar from stored results"
            )
        still = [m for m in self.models if m not in results]
        if still and not self.backend.final_errors:
            detail = "; ".join(e["message"] or "" for e in job.data.get("errors", [])[-3:]) or "no answer"
            raise RetryLater(f"{len(still)} model(s) not answered ({', '.join(still)}): {detail}")
        await self._write(job, checked.sha256, results, list(job.data.get("errors", [])) if still else [])
        if still:  # the backend's errors are final: the sidecar says so, and the file fails at once
            job.data["partial_sidecar"] = True
            errors = "; ".join(f"{e['model']}: {e['message']}" for e in job.data.get("errors", [])[-len(still) :])
            raise BadInput(f"sidecar written without {', '.join(still)}: {errors}")
        log.info("analyze.done", path=job.file.path, sidecar=job.data.get("sidecar"))
        return StepResult(State.DONE)

    async def give_up(self, job: Job, error: str) -> None:
        """The runner gave up: write the sidecar with what was answered and why the rest is missing."""
        sha256 = job.data.get("sha256") or job.file.sha256
        if not sha256 or job.data.pop("partial_sidecar", False):
            return
        results = await self.store.results_for(sha256, self.backend.key)
        errors = [*job.data.get("errors", []), {"model": None, "message": error}]
        await self._write(job, sha256, results, errors)

    async def _adopt(self, job: Job, sha256: str, missing: list[str]) -> dict[str, StoredResult]:
        """Results for ``missing`` models that the file's sidecar holds for the same content, endpoint and account
        (see watcher.pipelines.adopt): stored as if answered now, and the sidecar is left as it is."""
        target = sidecar_path(job.file.path, job.file.folder, self.sidecar)
        found, why = await asyncio.to_thread(
            read_sidecar_results,
            target,
            sha256=sha256,
            size=job.file.size,
            backend=self.backend.describe(),
            models=missing,
        )
        if not found:
            if why != "no sidecar":
                log.info("analyze.not_adopted", path=job.file.path, reason=why, next="asking the service")
            return {}
        for result in found.values():
            await self.store.save_result(sha256, self.backend.key, result)
        job.data["sidecar"] = str(target)
        log.info(
            "analyze.adopted",
            path=job.file.path,
            sidecar=str(target),
            models=sorted(found),
            next="no request for these models" + ("" if len(found) == len(missing) else "; asking for the rest"),
        )
        return found

    async def _ask(self, job: Job, checked: Checked, missing: list[str]) -> dict[str, StoredResult]:
        """Ask the backend for ``missing`` models (through the gate when paid); results are saved as they come,
        and returned as saved (by requested model)."""
        sha256, path = checked.sha256, job.file.path
        ops = {m: Operation(sha256, self.backend.key, f"analyze:{m}", on_doubt="reask") for m in missing}
        taken = None
        if self.paid is not None:
            taken = await self.paid.take(job, list(ops.values()), checked.seconds, estimated=checked.estimated)
            if not taken.send:
                return {}  # every model was answered for another copy meanwhile
            missing = [m for m in missing if ops[m] in taken.send]
        url = self.audio_url(job.file)
        via = {} if url is None else {"audio_url": without_query(url)}
        log.info("analyze.started", path=path, models=missing, **via)
        answered: dict[Operation, str | None] = {}
        saved: dict[str, StoredResult] = {}

        async def save(answer: ModelAnswer) -> None:
            stored = StoredResult(
                answer.requested, answer.model_name, answer.model_version, answer.correlation_id, answer.results
            )
            fence = taken.fences.get(ops[answer.requested]) if taken and answer.requested in ops else None
            op = ops[answer.requested] if fence is not None else None
            if not await self.store.save_result(
                sha256, self.backend.key, stored, op, fence
            ):  # answered, if still ours
                assert taken is not None
                taken.late = True
            saved[answer.requested] = stored
            if op is not None:
                answered[op] = None
            log.debug("analyze.model_done", path=path, model=answer.model_name)  # analyze.done tells the file's end

        body = FileBody(path, Signature(job.file.size, job.file.mtime_ns, job.file.inode), content=checked.content)
        ending, why = "answered", "no result in the stream"
        try:
            if url is None:
                report = await self.backend.analyze(body, missing, save)
            else:  # the service fetches the audio: the gate above still went by the local file's content
                report = await self.backend.analyze(body, missing, save, audio_url=url)
        except BaseException as exc:
            # not sent (or stopped while waiting for its turn) or refused: the models are free again, not paid;
            # else the models not received are re-asked by the next run's take
            ending = ending_of(exc, taken)
            if ending == "in_doubt" and answered:
                ending = "partial"
            why = str(exc) if isinstance(exc, NotSent) else f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if taken is not None and self.paid is not None:
                await self.paid.finish(taken, answered, ending, why)
        errors = [{"model": None, "message": m} for m in report.errors]
        errors += [{"model": spec, "message": m} for spec, m in report.model_errors.items()]
        if errors:  # written with the step's release, in its one transaction
            job.data["errors"] = [*job.data.get("errors", []), *errors][-20:]
        return saved

    async def _write(
        self, job: Job, sha256: str, results: Mapping[str, StoredResult], errors: Sequence[Mapping[str, Any]]
    ) -> None:
        backend = self.backend.describe()
        if self.backend.paid:  # how the service gets this file: its bytes, or a URL it fetches (never its query)
            url = self.audio_url(job.file)
            backend |= {"input": "body"} if url is None else {"input": "audio-url", "audio_url": without_query(url)}
        doc = analysis_document(job.file, sha256, backend=backend, models=self.models, results=results, errors=errors)
        target = sidecar_path(job.file.path, job.file.folder, self.sidecar)
        written = await write_sidecar(target, sha256, doc, revision=job.file, live=lambda: self.store.is_live(job))
        if written:  # recorded by the release that ends the step (the sidecar itself is on disk already)
            job.data["sidecar"] = str(target)
        elif await self.store.is_live(job):
            raise FileChanged("the file changed before its sidecar was written; its new revision is analysed anew")
