"""The store's ports: what every adapter (SQLite today, PostgreSQL for several machines) must offer.

Consumers declare the small part they use (the runner's JobQueue, each pipeline's store Protocol, the
detector's sink); this module names the whole contract once, grouped by who needs it, and
``tests/test_store.py`` and ``tests/test_gate.py`` check every adapter against it. Guarantees an adapter must
keep, whatever its database: a claim leases a job to one holder; commits and releases are refused
(LeaseLost) once the lease is lost or the job superseded; the gate's take is one transaction under a
unique key per operation, so no two takers can both send; a cap is checked in the same transaction; an
operation's ending is a compare-and-set on the fence its take was given, so a late one changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from watcher.store.models import (
    Fence,
    FileQuery,
    FileRevision,
    Job,
    Listed,
    NewRevision,
    Operation,
    Problem,
    Signatures,
    State,
    Step,
    StoredResult,
    Ticket,
)


class Registry(Protocol):
    """Revisions, as detection records them."""

    def known_revision(self, path: str, size: int, mtime_ns: int, inode: int) -> bool: ...

    def current_signatures(self, folder: str) -> Signatures:
        """One query: the current revisions under ``folder``, grouped by the local folder each is in (its path,
        no trailing separator) -> file name -> (size, mtime_ns, inode); the inode is None where the adapter does
        not compare it (a store shared across mounts)."""
        ...

    def register_revision(
        self,
        *,
        folder: str,
        path: str,
        rel_path: str,
        size: int,
        mtime_ns: int,
        inode: int,
        jobs: Iterable[tuple[str, Step]],
        now: float | None = None,
        live: bool = False,
        priority: int = 0,
    ) -> tuple[int, bool]: ...

    def register_revisions(
        self, revisions: Sequence[NewRevision], *, jobs: Iterable[tuple[str, Step]], now: float | None = None
    ) -> list[tuple[int, bool]]: ...

    def current_revision(self, path: str) -> FileRevision | None: ...

    def set_sha256(self, file_id: int, sha256: str) -> None: ...


class Jobs(Protocol):
    """Claim with a lease, commit, release: the runner's and the pipelines' way to move a job on."""

    def claim(self, pipeline: str, holder: str, *, lease: float = 600.0, now: float | None = None) -> Job | None: ...

    def commit(self, job: Job, *, step: Step | None = None, **data: Any) -> None: ...

    def release(
        self,
        job: Job,
        *,
        state: State = State.PENDING,
        step: Step | None = None,
        next_attempt_at: float | None = None,
        error: str | None = None,
        error_code: str | None = None,
        count_attempt: bool = False,
    ) -> None: ...

    def is_live(self, job: Job) -> bool: ...

    def renew(self, job_ids: Iterable[int], holder: str, *, lease: float = 600.0) -> None: ...

    def release_leases(self, holder: str | None = None) -> int: ...

    def next_due(self, pipeline: str) -> float | None: ...

    def pending(self, pipeline: str | None = None, paths: Iterable[str] | None = None) -> int: ...

    def get_job(self, job_id: int) -> Job | None: ...


class Results(Protocol):
    """Analysis results by content, backend (where the work was done) and model."""

    def results_for(self, sha256: str, backend: str) -> dict[str, StoredResult]: ...

    def stored_models(self, sha256s: Sequence[str], backend: str) -> dict[str, set[str]]:
        """The model specs stored for each of these contents (those with none left out), for many at once."""
        ...

    def save_result(
        self, sha256: str, backend: str, result: StoredResult, op: Operation | None = None, fence: Fence | None = None
    ) -> bool: ...


class Gate(Protocol):
    """The paid-operation gate and its ledger (see watcher.store.sqlite.gate for the states)."""

    def gate_take(
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
        now: float | None = None,
        take_id: str | None = None,
    ) -> list[Ticket]: ...

    def gate_answered(self, op: Operation, result: str | None = None, *, fence: Fence) -> bool: ...

    def gate_release(self, op: Operation, state: str, *, fence: Fence, error: str | None = None) -> bool: ...

    def gate_get(self, op: Operation) -> dict[str, Any] | None: ...

    def gate_adopt(self, op: Operation, result: str) -> bool: ...

    def gate_resend(self, ops: Sequence[tuple[str, str, str, str]]) -> int: ...

    def gate_recover(self, holder: str | None = None) -> int: ...

    def ledger_ending(self, request: int, ending: str) -> None: ...

    def ledger_settle(self, sha256: str, seconds: float) -> int: ...

    def ledger_lines(self, first_day: str, last_day: str) -> list[dict[str, Any]]: ...

    def set_remote_state(self, op: Operation, state: str, error: str | None = None) -> None: ...

    def forget_operation(self, op: Operation) -> None: ...

    def answered_operations(self, sha256: str, service: str) -> set[str]: ...

    def in_doubt_operations(self) -> list[dict[str, Any]]: ...

    def spend_on(self, day: str) -> dict[str, dict[str, Any]]: ...

    def adopt_legacy(self, old: str, new: str) -> int: ...


class Control(Protocol):
    """Folders, reports and retries: what `watcher status`, `retry`, `pause` and the web page use."""

    def counts(self) -> dict[str, dict[str, int]]: ...

    def open_counts(self) -> dict[str, dict[str, int]]: ...

    def problems(self, limit: int | None = None) -> list[Problem]: ...

    def folder_counts(self) -> dict[str, int]: ...

    def finished_since(self, since: float) -> dict[str, int]: ...

    def spent_since(self, since: float) -> dict[str, float]: ...

    def open_files(self, limit: int) -> list[Listed]: ...

    def list_files(self, query: FileQuery) -> tuple[list[Listed], int, bool]: ...

    def listed(self, path: str) -> Listed | None: ...

    def jobs_of_file(self, file_id: int) -> list[Job]: ...

    def jobs_of_current(self) -> list[Job]:
        """Every job of every current revision (the whole store: `watcher status` only)."""
        ...

    def jobs_under(self, paths: Sequence[str]) -> list[Job]:
        """The jobs of the current revisions at or under ``paths`` (files, or folders and all below), in path
        order: indexed ranges, read in proportion to the files found (what commands that name paths use)."""
        ...

    def current_jobs_after(self, file_id: int, files: int) -> list[Job]:
        """The jobs of the next ``files`` current revisions after ID ``file_id``, in ID order (a page, keyset)."""
        ...

    def retry(
        self,
        *,
        paths: Iterable[str] | None = None,
        failed: bool = False,
        in_doubt: bool = False,
        waiting_on_service: bool = False,
        pipelines: Sequence[str] | None = None,
    ) -> int: ...

    def wake_capped(self) -> int:
        """Make the jobs a daily cap deferred due now and clear today's cap marks (at every start and reload)."""
        ...

    def add_jobs(self, file_ids: Sequence[int], pipeline: str, step: Step) -> int: ...

    def reopen(self, job_ids: Sequence[int], step: Step) -> int: ...

    def promote(self, job_ids: Sequence[int]) -> int:
        """Rank these jobs, where pending, as live (`watcher scan PATH` on files already waiting); how many files."""
        ...

    def set_paused(self, folder: str, *, paused: bool) -> None: ...

    def paused_folders(self) -> set[str]: ...

    def set_folder_health(self, folder: str, *, mode: str | None, reason: str | None, available: bool) -> None: ...

    def folder_states(self) -> list[dict[str, Any]]: ...

    def prune(self, older_than_days: float, *, now: float | None = None) -> int: ...


class Nodes(Protocol):
    """The machines that share the store. A store of one machine (SQLite) answers as the only node: its leases and
    takes are all this node's, it has no other node to name, and it keeps no heartbeat."""

    @property
    def store_id(self) -> str | None:
        """The store's own identity when it keeps one (a shared store); None when it is kept beside it."""
        ...

    def use_folders(self, folders: dict[str, str], *, claim_only_these: bool = True) -> None:
        """This node's watched folders (local path -> folder ID from its marker); claims stay within them."""
        ...

    def claim_node_name(self, name: str, node_id: str) -> None:
        """Take ``name`` for this node; ConfigError while another live node answers to it."""
        ...

    def release_node(self, node_id: str, keep: str) -> tuple[int, int]:
        """Give back what earlier lives of this node held (leases, takes) except ``keep``'s: (jobs, operations)."""
        ...

    def node_alive(self, node_id: str) -> bool | None:
        """Whether another node still beats (None: the store cannot tell)."""
        ...

    def heartbeat(self, name: str, *, holder: str, version: str, folders: Sequence[str] = ()) -> None:
        """This node is alive (`watcher status` lists the nodes)."""
        ...

    def nodes(self) -> list[dict[str, Any]]:
        """Every node using the store: name, version, last heartbeat, jobs held."""
        ...


class StorePort(Registry, Jobs, Results, Gate, Control, Nodes, Protocol):
    """Everything an adapter offers; only the composition root needs the whole of it."""

    def close(self) -> None: ...


class StoreUnavailable(ConnectionError):
    """The store could not be reached, or did not answer in time: the call did nothing, or its effect is unknown
    (a commit whose answer was lost). Raised by an adapter after its own bounded retries, never after a hang."""
