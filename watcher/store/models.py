"""What the store hands out: revisions, claimed jobs, stored results, remote IDs, problems; the job states
and the file list's query, the same in both adapters."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, Self

from watcher.names import from_db

if TYPE_CHECKING:
    from watcher.store.rules import Verdict  # the gate's rules own the verdicts, and read these models


class Word(StrEnum):
    """A stored word's enum: a word this version does not know (a newer node's, in a shared store) is read as an
    unlisted member of its own with that value, so it is kept and written back as it was, never refused."""

    @classmethod
    def _missing_(cls, value: object) -> Self | None:
        """A word no member has: its own unlisted member (not cached, equal to the word); not a word: refused."""
        if not isinstance(value, str):
            return None
        unknown = str.__new__(cls, value)
        unknown._name_ = value
        unknown._value_ = value
        return unknown


class State(Word):
    """A job's state: pending (due at next_attempt_at, or leased), in_doubt (held for the user), or a final one.
    Stored as its value (``jobs.state``, shared by nodes of other versions): a member's value never changes."""

    PENDING = "pending"
    IN_DOUBT = "in_doubt"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    SUPERSEDED = "superseded"
    GONE = "gone"


class Step(Word):
    """One resumable piece of a pipeline: ``analyze``; archive's ``check`` → ``upload`` → ``process`` → ``fetch``.
    Stored as its value (``jobs.step``), like :class:`State`."""

    ANALYZE = "analyze"
    CHECK = "check"
    UPLOAD = "upload"
    PROCESS = "process"
    FETCH = "fetch"


TERMINAL = frozenset({State.DONE, State.FAILED, State.SKIPPED, State.SUPERSEDED, State.GONE})
STATES = frozenset(State)

@dataclass(frozen=True)
class FileRevision:
    """One revision of one file (one content of one path), as the store knows it."""

    id: int
    folder: str
    path: str
    rel_path: str
    size: int
    mtime_ns: int
    inode: int
    sha256: str | None
    current: bool


@dataclass(frozen=True)
class NewRevision:
    """A settled revision for :meth:`register_revisions`: what detection saw of it."""

    folder: str
    path: str
    rel_path: str
    size: int
    mtime_ns: int
    inode: int
    live: bool = False  # found as it arrived, not as backlog (see store.lanes)
    priority: int = 0  # its folder's priority: higher first


@dataclass
class Job:
    """One pipeline for one revision: the ``step`` it stands at and its ``state`` (see ``STATES``)."""

    id: int
    pipeline: str
    step: Step
    state: State
    attempts: int
    data: dict[str, Any]
    file: FileRevision
    last_error: str | None = None
    error_code: str | None = None
    holder: str | None = None  # who holds the lease: commits and releases by anyone else are refused
    claim: int | None = None  # which claim of it this is (grown by each): an older claim's changes are refused
    seen_holder: str | None = None  # whose lease holds it now, as a shared store reports it (status names the node)

    def given_back(self, state: State, step: Step | None, *, count_attempt: bool) -> None:
        """Update this copy as a store's ``release`` records it (both adapters call this first)."""
        assert state in STATES, state
        self.state = state
        if step is not None:
            self.step = step
        if count_attempt:
            self.attempts += 1


@dataclass(frozen=True)
class StoredResult:
    """One model's results for some content, as first received."""

    requested: str
    model_name: str
    model_version: str | None
    correlation_id: str | None
    results: Any


@dataclass(frozen=True)
class Operation:
    """A paid call's identity: what content, where (service endpoint and account), which operation, which parameters.

    ``on_doubt`` says what a lost answer means: ``hold`` (held for the user: resending might pay twice) or
    ``reask`` (asked again, counted: the analysis service keeps nothing, so a lost result is lost).
    """

    sha256: str
    service: str
    name: str
    params: str = ""
    on_doubt: Literal["hold", "reask"] = "hold"


@dataclass(frozen=True)
class Fence:
    """Which take holds an operation: its holder and the operation's generation (grown by every take). Every
    ending names it; one from a take that lost the operation (its lease ran out) is late and changes nothing
    the operation's new holder owns."""

    holder: str
    generation: int


@dataclass(frozen=True)
class Ticket:
    """The gate's answer for one operation: send it (taken), or why not."""

    verdict: Verdict
    op: Operation
    result: str | None = None  # answered: the stored ID
    resend: bool = False  # send: it was sent before without an answer (counted, maybe a duplicate)
    request: int | None = None  # send: the ledger line of this request
    since: float | None = None  # in_doubt: since when
    error: str | None = None  # in_doubt: why
    until: float | None = None  # wait/capped: when to look again
    holder: str | None = None  # wait: who is sending it
    first_cap: bool = False  # capped: the first refusal today for this budget
    spent_seconds: float = 0.0  # capped: audio seconds spent today
    cap_seconds: float | None = None
    fence: Fence | None = None  # send: what this take's ending must name (see Fence)


@dataclass
class Problem:
    """A job that needs attention, for `watcher status`."""

    path: str
    pipeline: str
    step: Step
    state: State
    error_code: str | None
    error: str | None
    attempts: int
    next_attempt_at: float | None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FileQuery:
    """A page of the file list: filters (each optional), the page (from 1) and its size."""

    state: str = ""
    folder: str = ""
    text: str = ""
    key: str = ""
    scale: str = ""
    bpm_min: float | None = None
    bpm_max: float | None = None
    page: int = 1
    size: int = 50

    @staticmethod
    def of(query: Mapping[str, str], size: int = 50) -> FileQuery:
        """The query of the page's URL: ``state``, ``folder``, ``q``, ``key`` (``A minor`` or ``A``), ``bpm_min``,
        ``bpm_max``, ``page``; unreadable values are ignored."""
        words = (query.get("key") or "").split()
        key = words[0][:1].upper() + words[0][1:].lower() if words else ""
        scale = words[1].lower() if len(words) > 1 else ""
        try:
            page = max(1, int(query.get("page") or 1))
        except ValueError:
            page = 1
        return FileQuery(
            state=query.get("state") or "",
            folder=(query.get("folder") or "").rstrip("/"),
            text=query.get("q") or "",
            key=key,
            scale=scale,
            bpm_min=_float(query.get("bpm_min")),
            bpm_max=_float(query.get("bpm_max")),
            page=page,
            size=size,
        )

    @property
    def filtered(self) -> bool:
        return bool(self.state or self.text or self.key or self.bpm_min is not None or self.bpm_max is not None)


@dataclass
class Listed:
    """One current revision with its jobs and the key, scale and tempo its stored results give."""

    file: FileRevision
    key: str | None = None
    scale: str | None = None
    bpm: float | None = None
    jobs: list[Job] = field(default_factory=list)


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _revision(row: sqlite3.Row) -> FileRevision:
    return FileRevision(
        id=row["fid"],
        folder=from_db(row["folder"]),
        path=from_db(row["path"]),
        rel_path=from_db(row["rel_path"]),
        size=row["size"],
        mtime_ns=row["mtime_ns"],
        inode=row["inode"],
        sha256=row["sha256"],
        current=bool(row["current"]),
    )


_JOB_SELECT = """
    SELECT j.*, f.id AS fid, f.folder, f.path, f.rel_path, f.size, f.mtime_ns, f.inode, f.sha256, f.current
    FROM jobs j JOIN files f ON f.id = j.file_id
"""


@dataclass(frozen=True)
class RetryAsk:
    """What `retry` was asked for, the rule both stores apply to each pending, failed or held job of a current
    revision: any under the paths asked for (``by_path``); else every failed one (``failed``), every one held
    (``in_doubt``), every one waiting on its paused service (``waiting_on_service``: a refused key, no credits).
    ``pipelines`` narrows it to those pipelines."""

    by_path: bool = False
    failed: bool = False
    in_doubt: bool = False
    waiting_on_service: bool = False
    pipelines: Sequence[str] | None = None

    def takes(self, state: State, error_code: str | None, pipeline: str) -> bool:
        """Whether this job is made due again."""
        if self.pipelines is not None and pipeline not in self.pipelines:
            return False
        if self.by_path:
            return True
        return (
            (self.failed and state == State.FAILED)
            or (self.in_doubt and state == State.IN_DOUBT)
            or (self.waiting_on_service and state == State.PENDING and error_code == "needs_user")
        )

    def narrowing(self, mark: str) -> tuple[str, list[Any]]:
        """What :meth:`takes` takes as an SQL condition on ``j`` (the jobs) with its arguments (``mark``: the
        store's placeholder), so a store reads only those rows: a start's retry of the jobs waiting on a service
        must not read the 60,000 other jobs waiting their turn."""
        args: list[Any] = []
        wanted = [] if self.by_path else [
            cond for on, cond in (
                (self.failed, "j.state='failed'"),
                (self.in_doubt, "j.state='in_doubt'"),
                (self.waiting_on_service, "(j.state='pending' AND j.error_code='needs_user')"),
            ) if on
        ]  # fmt: skip
        sql = "" if self.by_path else f" AND ({' OR '.join(wanted) or '1=0'})"
        if self.pipelines is not None:
            sql += f" AND j.pipeline IN ({', '.join([mark] * len(self.pipelines)) or 'NULL'})"
            args.extend(self.pipelines)
        return sql, args

    @staticmethod
    def release(state: State, data_json: str) -> tuple[str, list[Any]]:
        """The job's data once retried, and the keys of the operations it held in doubt (to be re-asked)."""
        data = json.loads(data_json)
        held = (data.pop("in_doubt", None) or {}) if state == State.IN_DOUBT else {}
        return json.dumps(data), list(held.get("keys", []))


# the current revisions of one watched folder, grouped by the folder each is in (its path, no trailing separator):
# folder -> file name -> (size, mtime_ns, inode); what a folder scan compares its listing with
Signatures = dict[str, dict[str, tuple[int, int, int | None]]]


def group_by_folder(
    rows: Iterable[tuple[str | bytes, int, int, int | None]], decode: Callable[[bytes], str] = os.fsdecode
) -> Signatures:
    """Revisions as (absolute path, size, mtime_ns, inode) rows, grouped (:data:`Signatures`); a path stored as
    bytes is ``decode``d. One pass, for a folder of a hundred thousand files."""
    grouped: Signatures = {}
    sep = os.sep
    for path, size, mtime_ns, inode in rows:
        folder, _, name = (path if isinstance(path, str) else decode(path)).rpartition(sep)
        names = grouped.get(folder or sep)
        if names is None:
            names = grouped[folder or sep] = {}
        names[name] = (size, mtime_ns, inode)
    return grouped
