"""Adoption: paid work that a new (or lost) store does not know, taken back from the sidecars and delivery
manifests on disk instead of being paid for again.

Trust is decided by content and by who did the work, never by names or times:

- a **sidecar** is trusted for a file version when its source size and sha256 are the file's (its mtime may
  differ after a copy to a new machine), its backend is the remote service at the same endpoint, and its account
  fingerprint (sidecar schema 1.1), when it has one, is the configured account's. A sidecar written before the
  fingerprint was recorded is trusted for the same endpoint.
- a **delivery folder** is trusted when its manifest describes the same content (sha256 and size) and holds the
  wanted versions, and every file it lists is on disk with the size and sha256 the manifest gives.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from watcher.audiofile import sha256_of
from watcher.config import canonical_endpoint
from watcher.fsutil import read_json_object
from watcher.names import display
from watcher.store import StoredResult

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
    content and this ``backend`` (what the analyzer describes: name, base_url, account); and why not, when none.
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
