"""The short commands, as functions over the same object graph as the daemon: scan, dry run, status, retry,
pause and resume. The CLI parses arguments and prints; the web page will call these too."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from watcher.app import App, store_path
from watcher.app import open_store as open_adapter
from watcher.config import FolderConfig, Settings, service_identity
from watcher.errors import ConfigError
from watcher.fsutil import StateLock, read_json_object, use_node
from watcher.runner import Outcome
from watcher.store import TERMINAL, Store

SCAN_SETTLE = 1.0


def open_store(settings: Settings) -> Store:
    """The store of a watcher that has run with these settings (ConfigError when there is none yet)."""
    if settings.store.url:
        return open_adapter(settings)  # type: ignore[no-any-return]  # the shared store: same ports
    path = store_path(settings)
    if not path.exists():
        raise ConfigError(f"no store at {path} yet: watcher has not run with state_dir = {settings.state_dir}")
    return Store(path)


def under(path: str, targets: Sequence[str]) -> bool:
    """True when ``path`` is one of ``targets`` or inside one of them."""
    return any(Path(path).is_relative_to(t) for t in targets)


async def scan(
    settings: Settings, paths: Sequence[Path], *, progress: bool = False
) -> tuple[int, list[dict[str, Any]]]:
    """`watcher scan`: register what is under ``paths`` now, process it, and report (exit code, problems)."""
    folders, files = scan_targets(settings, paths)
    lock = StateLock(settings.state_dir)
    lock.acquire()
    try:
        app = App.build(settings, folders=folders)
    except BaseException:
        lock.release()
        raise
    try:
        use_node(app.node_id)
        release_node = getattr(app.store, "release_node", None)  # a shared store: other nodes may be working
        claim_name = getattr(app.store, "claim_node_name", None)
        if release_node is not None and claim_name is not None:
            claim_name(settings.store.node_name, app.node_id)  # refused while a live node answers to the name
            release_node(app.node_id, app.runner.owner)  # take back only our own
        else:
            app.store.release_leases()
            app.store.gate_recover()
        # The user says the files are there now: one quiet second (or less) confirms nothing is writing.
        folders = [f.model_copy(update={"settle_seconds": min(f.settle_seconds, SCAN_SETTLE)}) for f in folders]
        detector = app.make_detector(folders)
        for folder in folders:
            if any(str(p) == str(folder.path) for p in paths):
                await detector.scan(str(folder.path))
        for f in files:
            detector.hint(str(f))
        await detector.settle_all()
        targets = [str(p) for p in paths]
        bar = _progress(app.store.pending(), progress)
        if bar is not None:
            from watcher.events import Subscriber

            class Tick(Subscriber):
                def outcome(self, outcome: Outcome) -> None:
                    if outcome.state in TERMINAL:
                        bar.update(1)

            app.events.subscribers.append(Tick())
        await app.runner.drain()
        if bar is not None:
            bar.close()
        problems = [
            {"path": p.path, "pipeline": p.pipeline, "state": p.state, "step": p.step, "error": p.error}
            for p in app.store.problems()
            if under(p.path, targets)
        ]
        return (1 if any(p["state"] == "failed" for p in problems) else 0), problems
    finally:
        await app.aclose()
        lock.release()


def scan_targets(settings: Settings, paths: Sequence[Path]) -> tuple[list[FolderConfig], list[Path]]:
    """Folders to walk and single files to hint; a path inside a configured folder keeps that folder's options."""
    folders: dict[str, FolderConfig] = {}
    files: list[Path] = []
    for raw in paths:
        path = Path(os.path.abspath(raw))
        if not path.exists():
            raise ConfigError(f"{path} does not exist")
        owner = settings.folder_for(path)
        if path.is_dir():
            folder = owner if owner is not None and owner.path == path else FolderConfig(path=path)
            if owner is not None and folder is not owner:
                folder = owner.model_copy(update={"path": path})
            folders[str(folder.path)] = folder
        else:
            folder = owner or FolderConfig(path=path.parent, recursive=False)
            folders.setdefault(str(folder.path), folder)
            files.append(path)
    return list(folders.values()), files


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="watcher scan")


def status(settings: Settings) -> dict[str, Any]:
    """`watcher status`: the report as plain data (what `--json` prints)."""
    from watcher.status import collect

    store = open_store(settings)
    try:
        return collect(
            store,
            state_dir=str(settings.state_dir),
            configured=[str(f.path) for f in settings.folders],
            caps={
                "analysis": settings.analysis.daily_audio_minutes,
                "processing": settings.archive.daily_audio_minutes,
            },
            web=web_state(settings),
        )
    finally:
        store.close()


def web_state(settings: Settings) -> dict[str, Any] | None:
    """What the daemon last said about its page (state_dir/web.json): None when no daemon with the page runs."""
    doc = read_json_object(settings.state_dir / "web.json")
    if doc is None:
        return None
    try:
        os.kill(int(doc["pid"]), 0)  # a daemon that died without stopping leaves the file behind
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return doc


def retry(settings: Settings, paths: Sequence[Path], *, failed: bool = False, in_doubt: bool = False) -> int:
    """`watcher retry`: make failed, waiting or held jobs due now (see Store.retry); how many were reset."""
    if not paths and not failed and not in_doubt:
        raise ConfigError("say what to retry: PATH..., --failed or --in-doubt")
    store = open_store(settings)
    try:
        selected: list[str] | None = None
        if paths:
            targets = [os.path.abspath(p) for p in paths]
            selected = [j.file.path for j in store.jobs_of_current() if under(j.file.path, targets)]
        return store.retry(paths=selected, failed=failed, in_doubt=in_doubt)
    finally:
        store.close()


def jobs_of(settings: Settings, path: str) -> list[dict[str, Any]]:
    """The jobs of a file's current version with attempts, step, state, error and what they recorded
    (for the web page's file view); empty when the store does not know the file."""
    store = open_store(settings)
    try:
        version = store.current_version(os.path.abspath(path))
        jobs = store.jobs_of_file(version.id) if version is not None else []
        return [
            {
                "pipeline": j.pipeline,
                "step": j.step,
                "state": j.state,
                "attempts": j.attempts,
                "error": j.last_error,
                "error_code": j.error_code,
                "data": j.data,
            }
            for j in jobs
        ]
    finally:
        store.close()


def pause(settings: Settings, folder: Path, *, paused: bool) -> str:
    """`watcher pause` / `resume`: kept in the store; returns the folder as recorded."""
    path = os.path.abspath(folder.expanduser())
    store = open_store(settings) if settings.store.url else Store(store_path(settings))
    try:
        store.set_paused(path, paused)
    finally:
        store.close()
    return path


def adopt(settings: Settings, folder: Path) -> tuple[str, str | None, str]:
    """`watcher adopt`: make this store the owner of ``folder``'s marker; (folder, previous owner, our store)."""
    from watcher import markers

    path = Path(os.path.abspath(folder.expanduser()))
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder")
    store = open_adapter(settings)
    try:
        mine = markers.store_id(store, settings.state_dir)
    finally:
        store.close()
    before = markers.read_marker(path)
    markers.adopt(path, mine, settings.store.node_name)
    return str(path), None if before is None else str(before.get("store")), mine


def dry_run(settings: Settings, paths: Sequence[Path]) -> Any:
    """`watcher scan --dry-run`: what would be asked and paid for, from the store opened read-only."""
    from watcher.analyzers import choose_backend
    from watcher.dryrun import dry_run as plan

    analysis_key, which = "", "remote"
    if settings.analysis.enabled:
        which, _ = choose_backend(settings.analysis)
        cfg = settings.analysis
        analysis_key = "local" if which == "local" else service_identity("analysis", cfg.base_url, cfg.api_key)
    archive = settings.archive
    processing_key = service_identity("processing", archive.base_url, archive.api_key)
    store = None
    if store_path(settings).exists():
        try:
            store = Store(store_path(settings), readonly=True)
        except sqlite3.Error:
            store = None
    try:
        return plan(
            settings,
            paths,
            cached_models=lambda sha: set(store.results_for(sha, analysis_key)) if store else set(),
            answered_operations=lambda sha: store.answered_operations(sha, processing_key) if store else set(),
            remote=which == "remote",
        )
    finally:
        if store is not None:
            store.close()
