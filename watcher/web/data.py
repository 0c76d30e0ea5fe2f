"""What the page shows, read from the store's pages of files and the files they name (sidecars, delivery
manifests): file rows with key, tempo and loudness, filters, and one file's detail."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from watcher.fsutil import read_json_object
from watcher.names import display, find_shown
from watcher.status import job_info
from watcher.store import FileQuery, Listed, State

PAGE_SIZE = 50
LOUDNESS_HOP_SECONDS = 0.1  # EBU R128 momentary and short-term values come every 100 ms
_sidecar_cache: dict[str, tuple[int, dict[str, Any]]] = {}


def sidecar(path: str | None) -> dict[str, Any] | None:
    """A sidecar, by its path or as :func:`watcher.names.display` shows it, cached by its modification time
    (file lists read many)."""
    if not path:
        return None
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        real = find_shown(path)
        if real is None or real == path:
            return None
        return sidecar(real)
    hit = _sidecar_cache.get(path)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    doc = read_json_object(path)
    if doc is None:
        return None
    if len(_sidecar_cache) > 5000:
        _sidecar_cache.clear()
    _sidecar_cache[path] = (mtime, doc)
    return doc


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def _results(doc: Mapping[str, Any] | None, model: str) -> dict[str, Any]:
    models = (doc or {}).get("models") or {}
    entry = models.get(model) or {}
    results = entry.get("results")
    return results if isinstance(results, dict) else {}


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def summary(doc: Mapping[str, Any] | None) -> dict[str, Any]:
    """Key, scale, key strength, BPM, integrated loudness and loudness range from a sidecar (None if absent)."""
    key = _results(doc, "key")
    bpm = _results(doc, "bpm_degara")
    loud = _results(doc, "loudness_ebur128")
    return {
        "key": _first(key.get("key")),
        "scale": _first(key.get("scale")),
        "key_strength": number(_first(key.get("strength"))),
        "bpm": number(bpm.get("bpm")),
        "integrated_lufs": number(_first(loud.get("integratedLoudness"))),
        "loudness_range": number(_first(loud.get("loudnessRange"))),
    }


def curves(doc: Mapping[str, Any] | None) -> dict[str, Any]:
    """The loudness curves over time and the beat positions, for the plot."""
    loud = _results(doc, "loudness_ebur128")
    bpm = _results(doc, "bpm_degara")

    def series(name: str) -> list[float]:
        values = _first(loud.get(name))
        return [float(v) for v in values] if isinstance(values, list) else []

    beats = bpm.get("beat_positions")
    return {
        "hop_seconds": LOUDNESS_HOP_SECONDS,
        "momentary": series("momentaryLoudness"),
        "short_term": series("shortTermLoudness"),
        "beats": [float(b) for b in beats] if isinstance(beats, list) else [],
    }


def state_of(entry: Mapping[str, Any]) -> str:
    """One word for a file's row: the worst of its jobs' states (failed, in_doubt, working, done)."""
    states = {j["state"] for j in entry["jobs"].values()}
    for word in (State.FAILED, State.IN_DOUBT, State.PENDING, State.GONE):
        if word in states:
            return word
    return State.DONE if states <= {State.DONE, State.SKIPPED, State.SUPERSEDED} else sorted(states)[0]


def row_of(entry: Listed) -> dict[str, Any]:
    """One current file as the list shows it: path, folder, state, jobs, and key, tempo and loudness (from its
    sidecar when there is one, else the key and tempo the store copied from its results)."""
    path = display(entry.file.path)
    jobs = {j.pipeline: job_info(j) for j in entry.jobs}
    summed = summary(sidecar(jobs.get("analyze", {}).get("sidecar")))
    for name, value in (("key", entry.key), ("scale", entry.scale), ("bpm", entry.bpm)):
        if summed[name] is None:
            summed[name] = value
    return {
        "path": path,
        "name": os.path.basename(path),
        "folder": display(entry.file.folder),
        "state": state_of({"jobs": jobs}),
        "jobs": jobs,
        **summed,
    }


def listing(store: Any, query: Mapping[str, str]) -> dict[str, Any]:
    """Page ``page`` (from 1) of ``PAGE_SIZE`` rows filtered by ``state``, ``folder``, ``q`` (in the path),
    ``key`` (``A minor`` or ``A``), ``bpm_min``/``bpm_max``: one indexed query in the store. ``total`` is exact up
    to the store's count cap (``capped`` then)."""
    ask = FileQuery.of(query, size=PAGE_SIZE)
    found, total, capped = store.list_files(ask)
    return {
        "total": total,
        "capped": capped,
        "page": ask.page,
        "page_size": PAGE_SIZE,
        "pages": max(1, -(-total // PAGE_SIZE)),
        "files": [row_of(e) for e in found],
    }


def deliveries(delivery: str | None) -> dict[str, Any] | None:
    """A delivery folder with its manifest, and each delivered audio file's absolute path (for the players)."""
    if not delivery:
        return None
    manifest = read_json_object(Path(delivery) / "manifest.json")
    files = []
    for f in (manifest or {}).get("files", []):
        if isinstance(f, dict) and isinstance(f.get("path"), str):
            files.append({**f, "absolute": str(Path(delivery) / f["path"])})
    return {"folder": delivery, "manifest": manifest, "files": files}
