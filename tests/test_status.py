"""`watcher status`: the report built from a real store in every state a user can meet, and its rendering."""

from __future__ import annotations

import os
import time

from watcher.status import SCHEMA_VERSION, collect, render
from watcher.store import Operation, Store


def test_the_report_shows_states_doubts_spend_and_problems(tmp_path):
    """Done, failed, held in doubt, waiting for a cap: each where a user looks, with paths shown safely."""
    store = Store(tmp_path / "w.db")
    try:
        names = ["done.wav", "bad.wav", "held.wav", os.fsdecode(b"caf\xe9.wav")]
        for n, name in enumerate(names):
            store.register_revision(
                folder="/in",
                path=f"/in/{name}",
                rel_path=name,
                size=1,
                mtime_ns=1,
                inode=n,
                jobs=[("archive", "check")],
            )
        claimed = [store.claim("archive", "me") for _ in names]
        by_name = {j.file.rel_path: j for j in claimed if j is not None}
        store.release(by_name["done.wav"], state="done")
        store.release(by_name["bad.wav"], state="failed", error="the content is not audio", error_code="bad_input")
        by_name["held.wav"].data["in_doubt"] = {"operation": "master", "since": 1700000000.0, "keys": []}
        store.release(by_name["held.wav"], state="in_doubt", step="process", error="answer lost", error_code="in_doubt")
        store.release(
            by_name[names[3]], next_attempt_at=time.time() + 3600, error="daily cap reached", error_code="capped"
        )
        op = Operation("ab" * 32, "processing x account:1", "upload")
        store.gate_take([op], "me", budget="processing", seconds=90.0, cap_seconds=600.0)
        report = collect(store, state_dir="/state", configured=["/in"], caps={"analysis": 0.0, "processing": 10.0})
    finally:
        store.close()
    assert report["counts"] == {"archive": {"done": 1, "failed": 1, "in_doubt": 1, "pending": 1}}
    assert report["in_doubt"] == [
        {"path": "/in/held.wav", "pipeline": "archive", "operation": "master", "since": "2023-11-14T22:13:20Z"}
    ]
    assert report["spend"]["processing"]["minutes_today"] == 1.5 and report["spend"]["processing"]["cap_minutes"] == 10
    assert {p["path"]: p["error_code"] for p in report["problems"]} == {
        "/in/bad.wav": "bad_input",
        "/in/caf\\xe9.wav": "capped",
        "/in/held.wav": "in_doubt",
    }
    files = {f["path"]: f["jobs"]["archive"] for f in report["files"]}
    assert files["/in/held.wav"]["state"] == "in_doubt" and files["/in/held.wav"]["step"] == "process"
    text = render(report)
    assert "in doubt since 2023-11-14T22:13:20Z" in text and "master" in text
    assert "processing 1.5 of 10 (daily cap) audio min in 1 paid calls" in text
    assert "archive failed at check (bad_input, 0 attempts): the content is not audio" in text
    assert "caf\\xe9.wav" in text
    text.encode("utf-8")  # printable whatever the names: no lone surrogate reaches a terminal


def test_the_brief_report_reads_open_files_and_first_problems_only(tmp_path):
    """Brief (the text and the page): files with work open and the first problems, with the backlog; no done file."""
    from watcher.status import SHOWN_FILES

    store = Store(tmp_path / "w.db")
    try:
        for n in range(SHOWN_FILES + 10):
            store.register_revision(
                folder="/in", path=f"/in/{n:03d}.wav", rel_path=f"{n:03d}.wav", size=1, mtime_ns=1, inode=n,
                jobs=[("analyze", "analyze")],
            )  # fmt: skip
        done = store.claim("analyze", "me")
        store.release(done, state="done")
        for _ in range(SHOWN_FILES + 2):
            job = store.claim("analyze", "me")
            store.release(job, state="failed", error="not audio", error_code="bad_input")
        report = collect(store, state_dir="/state", brief=True)
    finally:
        store.close()
    assert report["brief"] and report["counts"] == {"analyze": {"done": 1, "failed": SHOWN_FILES + 2, "pending": 7}}
    assert report["backlog"]["analyze"]["waiting"] == 7 and report["backlog"]["analyze"]["finished_recently"] == 43
    assert len(report["files"]) == SHOWN_FILES + 1 and done.file.path not in {f["path"] for f in report["files"]}
    assert len(report["problems"]) == SHOWN_FILES + 1
    text = render(report)
    assert "backlog:" in text and "analyze: 7 waiting" in text and "... and more" in text


class _SharedStore(Store):
    """A SQLite store answering ``nodes()`` as a shared one does (PostgreSQL's adapter names a lease's holder
    ``owner``)."""

    def nodes(self) -> list[dict[str, object]]:
        return [{"name": "a", "version": "0.2.0", "last_heartbeat": 1700000000.0, "jobs_held": 1, "owner": "a:1:2"}]


def test_the_json_has_a_schema_version_and_gives_renamed_keys_under_both_names(tmp_path):
    """`status --json` says its schema version (an integer); a key the vocabulary pass renamed is given under its
    new name and, until 0.4.0, its old one (nodes[].holder and nodes[].owner), in the report and when the store is
    unreachable."""
    from watcher.commands.reports import unreachable_report
    from watcher.config import Settings

    store = _SharedStore(tmp_path / "w.db")
    try:
        report = collect(store, state_dir="/state")
    finally:
        store.close()
    assert report["schema_version"] == SCHEMA_VERSION and isinstance(SCHEMA_VERSION, int) and SCHEMA_VERSION >= 2
    assert [(n["holder"], n["owner"]) for n in report["nodes"]] == [("a:1:2", "a:1:2")]
    down = unreachable_report(Settings(state_dir=tmp_path), {"unreachable_since": None}, None)
    assert down["schema_version"] == SCHEMA_VERSION
