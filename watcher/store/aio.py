"""The store's asynchronous port: how code on the event loop (runner, pipelines, daemon, steering) reaches the store.

Every call runs in an executor of the store's own, never on the loop: one thread for SQLite (one connection, one
writer), a few for PostgreSQL (each takes a pooled connection). A call the database cannot answer ends with
:class:`~watcher.store.ports.StoreUnavailable` within the adapter's bounds (connect and statement timeouts,
keepalives, a deadline per call), never with a hang; a call is never abandoned half way by the loop side (a take
or a claim whose caller gave up would still commit), so there is no timeout here, but for the close.

Every call passes one :class:`Guard`, given at construction: the one place to watch, hold or journal store work
while the store is away. The default guard just runs the call.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

from watcher.store.models import (
    Fence,
    FileRevision,
    Job,
    NewRevision,
    Operation,
    Signatures,
    State,
    Step,
    StoredResult,
    Ticket,
)
from watcher.store.ports import StorePort

CLOSE_PATIENCE = 0.5  # seconds a closing store waits for its calls under way before it ends them (see aclose)

P = ParamSpec("P")
T = TypeVar("T")


class Guard(Protocol):
    """Sees every store call: ``name`` is the port method's, ``call`` starts it in the store's executor."""

    async def __call__(self, name: str, call: Callable[[], Awaitable[T]]) -> T: ...


async def unguarded(name: str, call: Callable[[], Awaitable[T]]) -> T:
    """The default guard: run the call, let its errors through."""
    return await call()


class AsyncJobs(Protocol):
    """The runner's part: claim with a lease, release, renew, and when work falls due."""

    async def claim(self, pipeline: str, holder: str, *, lease: float = 600.0) -> Job | None: ...

    async def release(
        self,
        job: Job,
        *,
        state: State = State.PENDING,
        step: Step | None = None,
        next_attempt_at: float | None = None,
        error: str | None = None,
        error_code: str | None = None,
    ) -> None: ...

    async def renew(self, job_ids: Iterable[int], holder: str, *, lease: float = 600.0) -> None: ...

    async def next_due(self, pipeline: str) -> float | None: ...


class AsyncGate(Protocol):
    """The gate as paid calls use it (watcher.pipelines.paid): take, answered, released, the ledger's ending."""

    async def gate_take(
        self,
        ops: Sequence[Operation],
        holder: str,
        *,
        budget: str,
        seconds: float,
        cap_seconds: float | None = None,
        lease: float = 600.0,
        resend_in_doubt: bool = False,
        estimated: bool = False,
        take_id: str | None = None,
    ) -> list[Ticket]: ...

    async def gate_answered(self, op: Operation, result: str | None = None, *, fence: Fence) -> bool: ...

    async def gate_release(self, op: Operation, state: str, *, fence: Fence, error: str | None = None) -> bool: ...

    async def ledger_ending(self, request: int, ending: str) -> None: ...


class AsyncStore:
    """The whole store with ``await``: each method is the port method of the same name, run off the loop."""

    def __init__(self, store: StorePort, *, threads: int = 1, guard: Guard = unguarded) -> None:
        """``threads``: how many calls run at once (1 for SQLite; the pool's size for PostgreSQL)."""
        self.sync = store  # for code already off the loop (a worker thread, a short command)
        self.guard = guard
        self._executor = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="store")

    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` (a method of :attr:`sync`) in the store's executor, through the guard."""
        loop = asyncio.get_running_loop()
        bound = functools.partial(fn, *args, **kwargs)
        name = fn.__name__
        return await self.guard(name, lambda: loop.run_in_executor(self._executor, bound))

    async def aclose(self, *, close_store: bool = True) -> None:
        """Let the calls under way end, then close the store (unless its caller closes it). Calls still waiting on a
        store that does not answer after ``CLOSE_PATIENCE`` seconds are ended by closing it under them (each gets
        an error nobody waits for any more): a stop during an outage does not wait out their 30 s deadlines."""
        ended = asyncio.ensure_future(asyncio.to_thread(self._executor.shutdown, wait=True))
        if close_store:
            await asyncio.wait({ended}, timeout=CLOSE_PATIENCE)
            await asyncio.to_thread(self.sync.close)
        await ended

    # -- registry ----------------------------------------------------------------------------------------------

    async def known_revision(self, path: str, size: int, mtime_ns: int, inode: int) -> bool:
        return await self.call(self.sync.known_revision, path, size, mtime_ns, inode)

    async def current_signatures(self, folder: str) -> Signatures:
        return await self.call(self.sync.current_signatures, folder)

    async def register_revision(
        self,
        *,
        folder: str,
        path: str,
        rel_path: str,
        size: int,
        mtime_ns: int,
        inode: int,
        jobs: Iterable[tuple[str, Step]],
        live: bool = False,
        priority: int = 0,
    ) -> tuple[int, bool]:
        return await self.call(
            self.sync.register_revision,
            folder=folder,
            path=path,
            rel_path=rel_path,
            size=size,
            mtime_ns=mtime_ns,
            inode=inode,
            jobs=list(jobs),
            live=live,
            priority=priority,
        )

    async def register_revisions(
        self, revisions: Sequence[NewRevision], *, jobs: Iterable[tuple[str, Step]]
    ) -> list[tuple[int, bool]]:
        return await self.call(self.sync.register_revisions, revisions, jobs=list(jobs))

    async def current_revision(self, path: str) -> FileRevision | None:
        return await self.call(self.sync.current_revision, path)

    async def set_sha256(self, file_id: int, sha256: str) -> None:
        await self.call(self.sync.set_sha256, file_id, sha256)

    # -- jobs -------------------------------------------------------------------------------------------------

    async def claim(self, pipeline: str, holder: str, *, lease: float = 600.0) -> Job | None:
        return await self.call(self.sync.claim, pipeline, holder, lease=lease)

    async def commit(self, job: Job, *, step: Step | None = None, **data: Any) -> None:
        await self.call(self.sync.commit, job, step=step, **data)

    async def release(
        self,
        job: Job,
        *,
        state: State = State.PENDING,
        step: Step | None = None,
        next_attempt_at: float | None = None,
        error: str | None = None,
        error_code: str | None = None,
    ) -> None:
        await self.call(
            self.sync.release,
            job,
            state=state,
            step=step,
            next_attempt_at=next_attempt_at,
            error=error,
            error_code=error_code,
        )

    async def is_live(self, job: Job) -> bool:
        return await self.call(self.sync.is_live, job)

    async def renew(self, job_ids: Iterable[int], holder: str, *, lease: float = 600.0) -> None:
        await self.call(self.sync.renew, list(job_ids), holder, lease=lease)

    async def next_due(self, pipeline: str) -> float | None:
        return await self.call(self.sync.next_due, pipeline)

    async def pending(self) -> int:
        return await self.call(self.sync.pending)

    async def jobs_of_file(self, file_id: int) -> list[Job]:
        return await self.call(self.sync.jobs_of_file, file_id)

    async def jobs_under(self, paths: Sequence[str]) -> list[Job]:
        """The jobs of the current revisions at or under ``paths`` (indexed ranges, see the port)."""
        return await self.call(self.sync.jobs_under, list(paths))

    # -- results ----------------------------------------------------------------------------------------------

    async def results_for(self, sha256: str, backend: str) -> dict[str, StoredResult]:
        return await self.call(self.sync.results_for, sha256, backend)

    async def save_result(
        self, sha256: str, backend: str, result: StoredResult, op: Operation | None = None, fence: Fence | None = None
    ) -> bool:
        return await self.call(self.sync.save_result, sha256, backend, result, op, fence)

    # -- the gate ---------------------------------------------------------------------------------------------

    async def gate_take(
        self,
        ops: Sequence[Operation],
        holder: str,
        *,
        budget: str,
        seconds: float,
        cap_seconds: float | None = None,
        lease: float = 600.0,
        resend_in_doubt: bool = False,
        estimated: bool = False,
        take_id: str | None = None,
    ) -> list[Ticket]:
        return await self.call(
            self.sync.gate_take,
            ops,
            holder,
            budget=budget,
            seconds=seconds,
            cap_seconds=cap_seconds,
            lease=lease,
            resend_in_doubt=resend_in_doubt,
            estimated=estimated,
            take_id=take_id,
        )

    async def gate_answered(self, op: Operation, result: str | None = None, *, fence: Fence) -> bool:
        return await self.call(self.sync.gate_answered, op, result, fence=fence)

    async def gate_release(self, op: Operation, state: str, *, fence: Fence, error: str | None = None) -> bool:
        return await self.call(self.sync.gate_release, op, state, fence=fence, error=error)

    async def gate_get(self, op: Operation) -> dict[str, Any] | None:
        return await self.call(self.sync.gate_get, op)

    async def gate_adopt(self, op: Operation, result: str) -> bool:
        return await self.call(self.sync.gate_adopt, op, result)

    async def ledger_ending(self, request: int, ending: str) -> None:
        await self.call(self.sync.ledger_ending, request, ending)

    async def ledger_settle(self, sha256: str, seconds: float) -> int:
        return await self.call(self.sync.ledger_settle, sha256, seconds)

    async def set_remote_state(self, op: Operation, state: str, error: str | None = None) -> None:
        await self.call(self.sync.set_remote_state, op, state, error)

    # -- control and nodes ------------------------------------------------------------------------------------

    async def open_counts(self) -> dict[str, dict[str, int]]:
        return await self.call(self.sync.open_counts)

    async def folder_states(self) -> list[dict[str, Any]]:
        return await self.call(self.sync.folder_states)

    async def set_folder_health(self, folder: str, *, mode: str | None, reason: str | None, available: bool) -> None:
        await self.call(self.sync.set_folder_health, folder, mode=mode, reason=reason, available=available)

    async def retry(self, *, waiting_on_service: bool = False, pipelines: Sequence[str] | None = None) -> int:
        return await self.call(self.sync.retry, paths=None, waiting_on_service=waiting_on_service, pipelines=pipelines)

    async def promote(self, job_ids: Sequence[int]) -> int:
        return await self.call(self.sync.promote, job_ids)

    async def wake_capped(self) -> int:
        return await self.call(self.sync.wake_capped)

    async def prune(self, older_than_days: float) -> int:
        return await self.call(self.sync.prune, older_than_days)

    async def claim_node_name(self, name: str, node_id: str) -> None:
        await self.call(self.sync.claim_node_name, name, node_id)

    async def release_node(self, node_id: str, keep: str) -> tuple[int, int]:
        return await self.call(self.sync.release_node, node_id, keep)

    async def heartbeat(self, name: str, *, holder: str, version: str, folders: Sequence[str] = ()) -> None:
        await self.call(self.sync.heartbeat, name, holder=holder, version=version, folders=list(folders))


if TYPE_CHECKING:  # mypy checks both adapters against the whole port, and this port against its consumers' parts
    from watcher.store import Store
    from watcher.store.postgres import PostgresStore

    _sqlite: type[StorePort] = Store
    _postgres: type[StorePort] = PostgresStore
    _jobs: type[AsyncJobs] = AsyncStore
    _gate: type[AsyncGate] = AsyncStore
