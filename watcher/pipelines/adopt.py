"""Adoption: paid work that a new (or lost) store does not know, taken back from the sidecars and delivery
manifests on disk instead of being paid for again.

Trust is decided by content and by who did the work, never by names or times:

- a **sidecar** is trusted for a revision when its source size and sha256 are the file's (its mtime may
  differ after a copy to a new machine), its backend is the remote service at the same endpoint, and its account
  fingerprint (sidecar schema 1.1), when it has one, is the configured account's. A sidecar written before the
  fingerprint was recorded is trusted for the same endpoint.
- a **delivery folder** is trusted when its manifest describes the same content (sha256 and size) and holds the
  wanted versions, and every file it lists is on disk with the size and sha256 the manifest gives.
- **processing in progress**: as each processing ID arrives (the upload's audio ID, each request's ID), the archive
  pipeline also records it in the sidecar's ``archive.paid`` (written atomically), with the service it was paid at
  (endpoint and account fingerprint, as the gate keys operations) and the content (sha256, size). A new store that
  does not know an operation takes its ID from there only when all of it is the same: the content, the service
  and account, the operation and its parameters; then it polls and downloads, and uploads and requests nothing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import structlog

from watcher.audiofile import sha256_of
from watcher.config import canonical_endpoint
from watcher.fsutil import read_json_object
from watcher.names import display
from watcher.pipelines.sidecar import SCHEMA_MINOR, source_document, write_sidecar
from watcher.store import FileRevision, Operation, StoredResult

log = structlog.get_logger("watcher.adopt")


def _same_endpoint(a: object, b: object) -> bool:
    return isinstance(a, str) and isinstance(b, str) and canonical_endpoint(a) == canonical_endpoint(b)


def sidecar_results(
    doc: Mapping[str, Any] | None,
    *,
    sha256: str,
    size: int,
    backend: Mapping[str, Any],
    models: Sequence[str],
) -> tuple[dict[str, StoredResult], str | None]:
    """The results for ``models`` (by requested name) that the sidecar ``doc`` holds and may be trusted for this
    content and this ``backend`` (what the backend describes: name, base_url, account); and why not, when none.
    """
    if not doc:
        return {}, "no sidecar"
    source = doc.get("source")
    if not isinstance(source, dict) or source.get("sha256") != sha256 or source.get("size") != size:
        return {}, "the sidecar is about other content"
    theirs = doc.get("backend")
    if not isinstance(theirs, dict) or theirs.get("name") != backend.get("name") or backend.get("name") != "remote":
        return {}, "the sidecar's results come from another backend"
    if not _same_endpoint(theirs.get("base_url"), backend.get("base_url")):
        return {}, "the sidecar's results come from another endpoint"
    if "account" in theirs and theirs["account"] != backend.get("account"):
        return {}, "the sidecar's results were paid with another account"
    found: dict[str, StoredResult] = {}
    entries = doc.get("models")
    for name, entry in (entries if isinstance(entries, dict) else {}).items():
        if not isinstance(entry, dict) or "results" not in entry:
            continue
        requested = entry.get("requested")
        if isinstance(requested, str) and requested in models:
            version, correlation = entry.get("version"), entry.get("correlation_id")
            found[requested] = StoredResult(
                requested,
                str(name),
                version if isinstance(version, str) else None,
                correlation if isinstance(correlation, str) else None,
                entry["results"],
            )
    return found, None if found else "the sidecar holds none of the models asked for"


def read_sidecar_results(
    path: Path, *, sha256: str, size: int, backend: Mapping[str, Any], models: Sequence[str]
) -> tuple[dict[str, StoredResult], str | None]:
    """:func:`sidecar_results` of the sidecar at ``path`` (blocking: run it in a worker thread)."""
    return sidecar_results(read_json_object(path), sha256=sha256, size=size, backend=backend, models=models)


def verified_delivery(folder: Path, *, sha256: str, size: int, wanted: Sequence[str]) -> list[str] | None:
    """The versions of the delivery in ``folder`` when its manifest is about this content, holds every ``wanted``
    version and every file it lists matches its size and sha256 on disk; else None (blocking: a worker thread)."""
    manifest = read_json_object(folder / "manifest.json")
    if manifest is None:
        return None
    source = manifest.get("source")
    if not isinstance(source, dict) or source.get("sha256") != sha256 or source.get("size") != size:
        return None
    versions = manifest.get("versions")
    files = manifest.get("files")
    if not isinstance(versions, list) or not set(wanted) <= set(versions) or not isinstance(files, list) or not files:
        return None
    for entry in files:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            return None
        rel = PurePosixPath(entry["path"])
        if rel.is_absolute() or ".." in rel.parts:
            return None
        where = folder / rel
        try:
            if not where.is_file() or os.stat(where).st_size != entry.get("size"):
                return None
            if sha256_of(where)[1] != entry.get("sha256"):
                log.warning(
                    "adopt.delivery_mismatch",
                    delivery=display(folder),
                    file=display(str(rel)),
                    next="not adopted: the file is processed again",
                )
                return None
        except OSError:
            return None
    return [str(v) for v in versions]


class AdoptingGate(Protocol):
    """The part of the gate that resuming from a record uses."""

    async def gate_get(self, op: Operation) -> dict[str, Any] | None: ...

    async def gate_adopt(self, op: Operation, result: str) -> bool: ...


async def record_paid(
    path: Path,
    revision: FileRevision,
    sha256: str,
    answered: Mapping[str, tuple[Operation, str]],
    *,
    versions: Sequence[str],
    live: Callable[[], Awaitable[bool]],
) -> None:
    """Keep the processing IDs answered so far (product name -> its operation and ID) in the sidecar at ``path``,
    beside the user's file: the durable copy a new store resumes from (:func:`resume_ids`). A record that cannot be
    written is logged, never an error: the store holds the IDs already."""
    ids = {name: result for name, (_, result) in answered.items()}
    services = {op.service for op, _ in answered.values()}
    paid = {
        "service": services.pop() if len(services) == 1 else "",
        "sha256": sha256,
        "size": revision.size,
        "operations": {
            name: {"operation": op.name, "params": op.params, "id": result} for name, (op, result) in answered.items()
        },
    }
    archive = {
        "audio_id": ids.get("audio", ""),
        "jobs": {k: v for k, v in ids.items() if k != "audio"},
        "versions": dict.fromkeys(versions, "processing"),
        "delivery": None,
        "paid": paid,
    }
    update = {"schema_minor": SCHEMA_MINOR, "source": source_document(revision, sha256), "archive": archive}
    try:
        await write_sidecar(path, sha256, update, revision=revision, live=live)
    except OSError as exc:
        log.warning(
            "archive.record_failed",
            path=revision.path,
            sidecar=display(path),
            error=exc.strerror or str(exc),
            next="the store keeps the IDs; a lost store would not find them beside the file",
        )


def paid_ids(doc: Mapping[str, Any] | None, *, sha256: str, size: int, ops: Mapping[str, Operation]) -> dict[str, str]:
    """The IDs the sidecar ``doc``'s ``archive.paid`` record holds for these operations of the plan (product name ->
    its ID), trusted only for the same content, service and account, operation and parameters; none without the
    upload's (everything builds on it)."""
    archive = doc.get("archive") if doc else None
    paid = archive.get("paid") if isinstance(archive, dict) else None
    source = doc.get("source") if doc else None
    if not isinstance(paid, dict) or not isinstance(source, dict):
        return {}
    if (paid.get("sha256"), paid.get("size"), source.get("sha256"), source.get("size")) != (sha256, size) * 2:
        return {}
    entries = paid.get("operations")
    found: dict[str, str] = {}
    for name, op in ops.items():
        entry = entries.get(name) if isinstance(entries, dict) else None
        if (
            isinstance(entry, dict)
            and paid.get("service") == op.service
            and (entry.get("operation"), entry.get("params")) == (op.name, op.params)
            and isinstance(entry.get("id"), str)
            and entry["id"]
        ):
            found[name] = entry["id"]
    return found if "audio" in found else {}


async def resume_ids(
    path: Path, gate: AdoptingGate, *, sha256: str, size: int, ops: Mapping[str, Operation], where: str
) -> dict[str, str]:
    """Operations of the plan this gate has never taken whose IDs the sidecar at ``path`` holds (see
    :func:`paid_ids`) become answered with them; their IDs. Nothing when the gate knows the upload: its own
    record wins."""
    if await gate.gate_get(ops["audio"]) is not None:
        return {}
    found = paid_ids(await asyncio.to_thread(read_json_object, path), sha256=sha256, size=size, ops=ops)
    adopted = {
        name: found[name]
        for name in found
        if await gate.gate_get(ops[name]) is None and await gate.gate_adopt(ops[name], found[name])
    }
    if adopted:
        log.info(
            "archive.resumed",
            path=where,
            sidecar=display(path),
            operations=sorted(adopted),
            next="polling and downloading: nothing is uploaded or requested again",
        )
    return adopted
