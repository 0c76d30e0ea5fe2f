"""The JSON sidecar: where it goes, what it holds (schema version 1.1), and how it is written atomically.

Two pipelines contribute to one sidecar (analysis writes the results, the archive adds its IDs and
delivery folder), so every write merges with the sidecar already on disk for the same content.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from watcher import __version__
from watcher.audiofile import Signature
from watcher.config import SidecarConfig
from watcher.fsutil import read_json_object, write_json_atomic
from watcher.names import display
from watcher.store import FileRevision, StoredResult

SCHEMA_VERSION = 1
# 1: backend.account, the fingerprint of the account the results were paid with; 2: archive.paid, the processing IDs
# of work in progress (see watcher.pipelines.adopt)
SCHEMA_MINOR = 2
# One lock per sidecar path while some write holds it; a lock nobody holds is collected, so this never grows.
_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


def schema() -> dict[str, Any]:
    """The sidecar's JSON Schema, shipped in the package."""
    text = resources.files("watcher").joinpath("schemas/sidecar-v1.schema.json").read_text("utf-8")
    return dict(json.loads(text))


def sidecar_path(audio: str | Path, folder_root: str | Path, cfg: SidecarConfig) -> Path:
    """``<name><suffix>`` beside the audio, or at the same relative place under ``cfg.directory``."""
    audio = Path(audio)
    name = audio.name + cfg.suffix
    if cfg.directory is None:
        return audio.with_name(name)
    rel = Path(os.path.relpath(audio, folder_root))
    return Path(cfg.directory) / rel.parent / name


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat().replace("+00:00", "Z")


def _read(path: Path, sha256: str) -> dict[str, Any]:
    """The existing sidecar when it describes the same content, else an empty dict."""
    doc = read_json_object(path)
    if doc is None or doc.get("source", {}).get("sha256") != sha256:
        return {}
    return doc


def source_document(revision: FileRevision, sha256: str) -> dict[str, Any]:
    """What a sidecar says about the audio file it describes."""
    return {
        "name": display(Path(revision.path).name),
        "path": display(revision.path),
        "size": revision.size,
        "sha256": sha256,
        "mtime": _iso(revision.mtime_ns / 1e9),
    }


def analysis_document(
    revision: FileRevision,
    sha256: str,
    *,
    backend: Mapping[str, Any],
    models: Sequence[str],
    results: Mapping[str, StoredResult],
    errors: Sequence[Mapping[str, str | None]],
) -> dict[str, Any]:
    """The analysis part of a sidecar for one revision."""
    by_name: dict[str, Any] = {}
    for spec in models:
        r = results.get(spec)
        if r is not None:
            by_name[r.model_name] = {
                "requested": r.requested,
                "version": r.model_version,
                "correlation_id": r.correlation_id,
                "results": r.results,
            }
    return {
        "schema_version": SCHEMA_VERSION,
        "schema_minor": SCHEMA_MINOR,
        "source": source_document(revision, sha256),
        "backend": dict(backend),
        "models_requested": list(models),
        "models": by_name,
        "errors": [dict(e) for e in errors],
        "complete": all(spec in results for spec in models),
    }


async def write_sidecar(
    path: Path,
    sha256: str,
    update: Mapping[str, Any],
    *,
    revision: FileRevision | None = None,
    live: Callable[[], Awaitable[bool]] | None = None,
) -> bool:
    """Merge ``update`` into the sidecar at ``path`` (kept if it describes the same content); write atomically.

    Nothing is written (False) when ``live()`` says the job was superseded, or when the audio on disk is no
    longer ``revision`` (a newer revision will write its own sidecar): a late result never overwrites a newer one.
    Both checks run under the path's lock, which every sidecar write in this process takes.
    """
    async with _lock(path):
        if live is not None and not await live():
            return False

        def merge_and_write() -> bool:
            if revision is not None and not _on_disk(revision):
                return False
            doc = _read(path, sha256)
            doc.update(update)
            doc["created_at"] = _iso(dt.datetime.now(dt.UTC).timestamp())
            doc["watcher_version"] = __version__
            doc.setdefault("schema_version", SCHEMA_VERSION)
            write_json_atomic(path, doc)
            return True

        return await asyncio.to_thread(merge_and_write)


def _lock(path: Path) -> asyncio.Lock:
    lock = _locks.get(str(path))
    if lock is None:
        lock = _locks[str(path)] = asyncio.Lock()
    return lock


def _on_disk(revision: FileRevision) -> bool:
    """True while the audio on disk is still ``revision`` (size, mtime, inode)."""
    try:
        now = Signature.of(os.stat(revision.path))
    except OSError:
        return False
    return now == Signature(revision.size, revision.mtime_ns, revision.inode)


@contextlib.asynccontextmanager
async def live_revision(path: Path, revision: FileRevision, live: Callable[[], Awaitable[bool]]) -> AsyncIterator[bool]:
    """Hold the sidecar at ``path``'s lock (the one every sidecar write takes) and say whether the job is still
    live and the audio on disk still ``revision``: what a delivery checks before it touches the output folder."""
    async with _lock(path):
        yield await live() and await asyncio.to_thread(_on_disk, revision)
