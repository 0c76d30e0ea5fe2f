"""The enums' values are the words stored in the database and shown in status, logs and the page: nodes of other
versions share one PostgreSQL, so renaming a member must never change its value. The values are pinned here and
held against the SQLite schema's text and against what a fresh store writes and reads back."""

from __future__ import annotations

import json
import re

import pytest

from watcher.detect.settle import Readiness
from watcher.store import FileRevision, State, Step, Store
from watcher.store.lanes import IN_FLIGHT_STEPS, LANES
from watcher.store.rules import FINISHED, OPEN, Verdict, job_of
from watcher.store.sqlite.schema import OPEN_STATES, SCHEMA

SCHEMA_TEXT = "\n".join(SCHEMA)


def quoted(text: str) -> set[str]:
    """The words in single quotes in an SQL fragment."""
    return set(re.findall(r"'([^']*)'", text))


def job_predicates(column: str) -> set[str]:
    """Every word the schema's indexes on ``jobs`` compare ``column`` with (``= 'x'``, ``IN ('x', 'y')``)."""
    words: set[str] = set()
    for where in re.findall(r"CREATE INDEX \w+ ON jobs \([^)]*\)\s+WHERE ([^;]*)", SCHEMA_TEXT):
        for values in re.findall(rf"\b{column}\s+(?:NOT\s+)?(?:=|IN)\s*(\([^)]*\)|'[^']*')", where):
            words |= quoted(values)
    return words


def test_job_states_keep_their_stored_words():
    """Each state's value is the word the ``jobs.state`` column holds."""
    assert {s.name: s.value for s in State} == {
        "PENDING": "pending",
        "IN_DOUBT": "in_doubt",
        "DONE": "done",
        "FAILED": "failed",
        "SKIPPED": "skipped",
        "SUPERSEDED": "superseded",
        "GONE": "gone",
    }


def test_the_schemas_state_words_are_states():
    """The states the jobs indexes and the heartbeat's predicate name are members, as the rules list them."""
    named = job_predicates("state")
    assert {"pending", "in_doubt", "done", "failed", "skipped", "gone"} <= named <= set(State)
    assert quoted(OPEN_STATES) == set(OPEN)
    assert {"done", "failed", "skipped"} == set(FINISHED)


def test_steps_keep_their_stored_words():
    """Each step's value is the word the ``jobs.step`` column holds."""
    assert {s.name: s.value for s in Step} == {
        "ANALYZE": "analyze",
        "CHECK": "check",
        "UPLOAD": "upload",
        "PROCESS": "process",
        "FETCH": "fetch",
    }


def test_the_schemas_step_words_are_steps():
    """The steps the claim indexes and the lanes' conditions name are the in-flight steps."""
    assert job_predicates("step") == set(IN_FLIGHT_STEPS) == {"process", "fetch"}
    assert all(quoted(condition) == set(IN_FLIGHT_STEPS) for condition in LANES.values())


def test_the_gates_verdicts_keep_their_words():
    """The gate's verdicts are the words its tickets have always carried (shown in logs, compared by older code)."""
    assert {v.name: v.value for v in Verdict} == {
        "SEND": "send",
        "ANSWERED": "answered",
        "WAIT": "wait",
        "IN_DOUBT": "in_doubt",
        "CAPPED": "capped",
    }


def test_what_a_check_of_a_hint_finds_keeps_its_words():
    """A hinted file's readiness keeps the words detection's tests and logs know."""
    assert [r.value for r in Readiness] == ["ready", "waiting", "gone", "known", "skipped", "failed"]


def register(store: Store, path: str) -> int:
    file_id, _ = store.register_revision(
        folder="/in",
        path=path,
        rel_path=path.removeprefix("/in/"),
        size=10,
        mtime_ns=1,
        inode=7,
        jobs=[("analyze", "analyze")],
        now=100.0,
    )
    return int(file_id)


def test_a_state_is_stored_as_its_word_and_read_back_as_a_member(store):
    """A job released in each final state is counted under the plain word, and read back as the member."""
    finals = [State.DONE, State.FAILED, State.SKIPPED, State.GONE]
    ids = {state: register(store, f"/in/{state}.wav") for state in finals}
    for _ in finals:
        job = store.claim("analyze", "a", now=200.0)
        assert job is not None
        store.release(job, state=State(job.file.path.removeprefix("/in/").removesuffix(".wav")))
    counts = store.counts()["analyze"]
    assert counts == {"done": 1, "failed": 1, "skipped": 1, "gone": 1}
    for state, file_id in ids.items():
        (job,) = store.jobs_of_file(file_id)
        assert job.state is state


def test_a_step_is_stored_as_its_word_and_read_back_as_a_member(store):
    """A job committed at a step is read back at the member, in every adapter."""
    file_id = register(store, "/in/a.wav")
    job = store.claim("analyze", "a", now=200.0)
    assert job is not None and job.step is Step.ANALYZE
    store.commit(job, step=Step.UPLOAD)
    store.release(job, step=Step.FETCH, next_attempt_at=300.0)
    (again,) = store.jobs_of_file(file_id)
    assert again.step is Step.FETCH


def test_a_word_a_newer_node_wrote_is_kept_as_it_is():
    """A state or step this version does not know (a newer node's, in a shared store) is read as itself, not refused, so
    a release writes it back unchanged; it is no listed member."""
    file = FileRevision(1, "/in", "/in/a.wav", "a.wav", 10, 1, 7, None, current=True)
    row = {"id": 1, "pipeline": "analyze", "step": "master", "state": "parked", "attempts": 0, "data": "{}"}
    job = job_of(row | {"last_error": None, "error_code": None}, file)
    assert job.state == "parked" and isinstance(job.state, State) and job.state not in set(State)
    assert job.step == "master" and isinstance(job.step, Step) and job.step not in set(Step)
    assert f"{job.state}" == "parked" and json.dumps([job.state]) == '["parked"]'
    with pytest.raises(ValueError):
        State(5)
